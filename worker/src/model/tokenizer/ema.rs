//! EMA shadows (`LitEma`) as the reference checkpoint stores them: one buffer per parameter of
//! module `M`, named `ema_M.<parameter path with the dots removed>`, plus `ema_M.decay` and
//! `ema_M.num_updates`. Loading picks either these or the live weights.
//! Upstream: https://github.com/drx-code/EquivariantModeling/blob/main/tokenizer/ema.py

use std::collections::BTreeMap;
use tch::Tensor;

/// The modules the tokenizer keeps an EMA of (`ema_<module>`).
pub const EMA_MODULES: [&str; 5] = [
    "encoder",
    "decoder",
    "semantic_decoder",
    "quant_layer",
    "post_quant_layer",
];

/// Which copy of the weights to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightChoice {
    /// The EMA shadows (what the reference's inference uses).
    Ema,
    /// The live (trained) parameters.
    Live,
}

impl std::str::FromStr for WeightChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ema" => Ok(Self::Ema),
            "live" => Ok(Self::Live),
            other => Err(format!("weights must be ema or live, not {other:?}")),
        }
    }
}

/// `decoder.up.4.upsample.conv.conv.weight` -> `ema_decoder.up4upsampleconvconvweight`.
/// None when the name is not under a module with an EMA.
pub fn ema_name(live_name: &str) -> Option<String> {
    let (module, rest) = live_name.split_once('.')?;
    EMA_MODULES
        .contains(&module)
        .then(|| format!("ema_{module}.{}", rest.replace('.', "")))
}

/// True for the EMA bookkeeping scalars, which carry no weights.
pub fn is_ema_bookkeeping(name: &str) -> bool {
    name.split_once('.').is_some_and(|(m, rest)| {
        m.strip_prefix("ema_")
            .is_some_and(|m| EMA_MODULES.contains(&m))
            && (rest == "decay" || rest == "num_updates")
    })
}

/// True if the file holds EMA shadows for the tokenizer.
pub fn has_ema(file: &BTreeMap<String, Tensor>) -> bool {
    file.keys().any(|k| k.starts_with("ema_"))
}

/// The tensors to load, keyed by live parameter name, plus the file keys that were not selected.
/// With `Ema`, every live name `n` is read from `ema_name(n)` (a live name without an EMA module
/// is read as is); the live copies become "not selected".
pub fn select(
    file: &BTreeMap<String, Tensor>,
    live_names: &[String],
    choice: WeightChoice,
) -> (BTreeMap<String, Tensor>, Vec<String>) {
    let mut selected = BTreeMap::new();
    let mut used = std::collections::BTreeSet::new();
    for name in live_names {
        let key = match choice {
            WeightChoice::Live => name.clone(),
            WeightChoice::Ema => ema_name(name).unwrap_or_else(|| name.clone()),
        };
        if let Some(t) = file.get(&key) {
            selected.insert(name.clone(), t.shallow_clone());
            used.insert(key);
        }
    }
    let not_selected = file
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    (selected, not_selected)
}
