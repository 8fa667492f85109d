//! Every `eqim` and `eqim-coordinator` command line in the cluster recipes (the Slurm batch
//! scripts in configs/slurm/ and the Kubernetes manifests in configs/kubernetes/) goes through the
//! real argument parsers of the two binaries, so a renamed or removed flag fails the build
//! instead of a user's job. Shell variables are given sample values; Kubernetes `$(VAR)` comes
//! from the container's own `env`.

use clap::Parser;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod support;

/// One command line found in a recipe.
#[derive(Debug, Clone)]
struct Found {
    /// The batch script, or the manifest joined with the container's name.
    file: PathBuf,
    /// Line in the batch script or `sh -c` script; 0 for a container's command and args.
    line: usize,
    argv: Vec<String>,
}

impl Found {
    fn program(&self) -> &str {
        self.argv[0].rsplit('/').next().unwrap_or_default()
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Values for the shell variables of the batch scripts (what a job would see). A variable not
/// listed here expands to `x`, which is fine for paths and names; a flag that needs a number
/// and gets `x` fails loudly, naming the line, and the variable then belongs here.
fn sample_value(name: &str) -> Option<&'static str> {
    Some(match name {
        "EQIM_BIN" => "/opt/eqim/bin",
        "EQIM_PORT" => "29400",
        "EQIM_METRICS_PORT" => "9400",
        "THREADS" | "EQIM_THREADS" => "4",
        "EQIM_NUM_IMAGES" => "3000",
        "EQIM_CFG" => "7.0",
        "EQIM_BATCH_SIZE" => "32",
        "EQIM_DEVICE" => "cpu",
        "COORD_ADDR" | "EQIM_COORDINATOR" => "node1:29400",
        "node" => "node1",
        "slot" | "attempt" => "0",
        "SLURM_RESTART_COUNT" => "0",
        _ => return None,
    })
}

/// A shell token: a word (quotes removed, variables expanded) or an operator.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// `raw` keeps the text as written, to tell `"$EQIM_BIN/eqim"` from a mere mention.
    Word {
        text: String,
        raw: String,
    },
    /// An array expansion (`"${A[@]}"`): no words with the sample values.
    Nothing,
    Op(String),
}

/// Expands `$NAME`, `${NAME...}`, `$(...)` and `$((...))` at `chars[i]` (just after the `$`);
/// returns the expansion (None for an array) and the index after it.
fn expand(chars: &[char], mut i: usize) -> (Option<String>, usize) {
    let value = |name: &str| sample_value(name).unwrap_or("x").to_owned();
    match chars.get(i) {
        Some('(') => {
            let arithmetic = chars.get(i + 1) == Some(&'(');
            let mut depth = 0;
            while i < chars.len() {
                match chars[i] {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            (Some(if arithmetic { "9401" } else { "x" }.into()), i + 1)
        }
        Some('{') => {
            let end = chars[i..]
                .iter()
                .position(|c| *c == '}')
                .map_or(chars.len(), |p| i + p);
            let inner: String = chars[i + 1..end].iter().collect();
            if inner.ends_with("[@]") || inner.ends_with("[*]") {
                return (None, end + 1);
            }
            let name: String = inner
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (Some(value(&name)), end + 1)
        }
        Some(c) if c.is_alphabetic() || *c == '_' => {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            (Some(value(&name)), i)
        }
        Some('?') | Some('$') | Some('!') | Some('#') => (Some("0".into()), i + 1),
        _ => (Some("$".into()), i),
    }
}

/// Splits one logical shell line into words and operators (enough shell for these scripts:
/// quotes, escapes, expansions, `;` `&` `|` `&&` `||` `(` `)` and redirections).
fn tokenize(line: &str) -> Vec<Tok> {
    let chars: Vec<char> = line.chars().collect();
    let mut toks = Vec::new();
    let (mut text, mut raw, mut in_word, mut array) = (String::new(), String::new(), false, false);
    let mut i = 0;
    let flush = |toks: &mut Vec<Tok>,
                 text: &mut String,
                 raw: &mut String,
                 in_word: &mut bool,
                 array: &mut bool| {
        if *in_word {
            toks.push(if *array && text.is_empty() {
                Tok::Nothing
            } else {
                Tok::Word {
                    text: std::mem::take(text),
                    raw: std::mem::take(raw),
                }
            });
        }
        text.clear();
        raw.clear();
        *in_word = false;
        *array = false;
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => {
                flush(&mut toks, &mut text, &mut raw, &mut in_word, &mut array);
                i += 1;
            }
            '#' if !in_word => break,
            ';' | '&' | '|' | '(' | ')' | '<' | '>' => {
                // `2>` and `&>`: the digit before a redirection is no word.
                if c == '>' && in_word && text.chars().all(|d| d.is_ascii_digit()) {
                    text.clear();
                    raw.clear();
                    in_word = false;
                }
                flush(&mut toks, &mut text, &mut raw, &mut in_word, &mut array);
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                let op = if ["&&", "||", ">>", ";;"].contains(&two.as_str()) {
                    two
                } else {
                    c.to_string()
                };
                i += op.chars().count();
                toks.push(Tok::Op(op));
            }
            '\'' => {
                in_word = true;
                let end = chars[i + 1..]
                    .iter()
                    .position(|q| *q == '\'')
                    .map_or(chars.len(), |p| i + 1 + p);
                text.extend(&chars[i + 1..end]);
                raw.extend(&chars[i..(end + 1).min(chars.len())]);
                i = end + 1;
            }
            '"' => {
                in_word = true;
                raw.push('"');
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        text.push(chars[i + 1]);
                        raw.extend(&chars[i..i + 2]);
                        i += 2;
                    } else if chars[i] == '$' {
                        let (v, next) = expand(&chars, i + 1);
                        raw.extend(&chars[i..next]);
                        match v {
                            Some(v) => text.push_str(&v),
                            None => array = true,
                        }
                        i = next;
                    } else {
                        text.push(chars[i]);
                        raw.push(chars[i]);
                        i += 1;
                    }
                }
                raw.push('"');
                i += 1;
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.get(i + 1) {
                    text.push(*n);
                    raw.extend(&chars[i..i + 2]);
                }
                i += 2;
            }
            '$' => {
                in_word = true;
                let (v, next) = expand(&chars, i + 1);
                raw.extend(&chars[i..next]);
                match v {
                    Some(v) => text.push_str(&v),
                    None => array = true,
                }
                i = next;
            }
            _ => {
                in_word = true;
                text.push(c);
                raw.push(c);
                i += 1;
            }
        }
    }
    flush(&mut toks, &mut text, &mut raw, &mut in_word, &mut array);
    toks
}

fn is_eqim_program(raw: &str) -> bool {
    let unquoted = raw.trim_matches(|c| c == '"' || c == '\'');
    ["eqim", "eqim-coordinator"]
        .iter()
        .any(|p| unquoted == *p || unquoted.ends_with(&format!("/{p}")))
}

/// The eqim command lines of a shell script: an eqim program as the first word of a simple
/// command, after `exec`, or as the program `srun` starts; its arguments run to the next
/// operator. Mentions (`command -v eqim`, `[ -x "$EQIM_BIN/eqim" ]`) are not commands.
fn shell_commands(file: &Path, script: &str, first_line: usize) -> Vec<Found> {
    let mut found = Vec::new();
    let lines: Vec<&str> = script.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let start = i;
        let mut logical = String::new();
        while i < lines.len() {
            let l = lines[i];
            i += 1;
            if let Some(body) = l.strip_suffix('\\') {
                logical.push_str(body);
                logical.push(' ');
            } else {
                logical.push_str(l);
                break;
            }
        }
        let toks = tokenize(&logical);
        let mut command_start = 0;
        let mut k = 0;
        while k < toks.len() {
            match &toks[k] {
                Tok::Op(_) => command_start = k + 1,
                Tok::Word { raw, .. } if is_eqim_program(raw) => {
                    let first = match toks.get(command_start) {
                        Some(Tok::Word { text, .. }) => text.as_str(),
                        _ => "",
                    };
                    let leads = k == command_start || matches!(first, "exec" | "srun");
                    if leads {
                        let mut argv = Vec::new();
                        let mut j = k;
                        while j < toks.len() {
                            match &toks[j] {
                                Tok::Op(_) => break,
                                Tok::Word { text, .. } => argv.push(text.clone()),
                                Tok::Nothing => {}
                            }
                            j += 1;
                        }
                        found.push(Found {
                            file: file.to_owned(),
                            line: first_line + start,
                            argv,
                        });
                        k = j;
                        continue;
                    }
                }
                _ => {}
            }
            k += 1;
        }
    }
    found
}

/// Expands Kubernetes' `$(VAR)` from the container's literal env values (downward-API values
/// become `x`).
fn k8s_expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(p) = rest.find("$(") {
        out.push_str(&rest[..p]);
        let after = &rest[p + 2..];
        let Some(end) = after.find(')') else {
            out.push_str(&rest[p..]);
            return out;
        };
        out.push_str(env.get(&after[..end]).map_or("x", String::as_str));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn yaml_strings(v: Option<&serde_yaml::Value>) -> Vec<String> {
    v.and_then(|v| v.as_sequence())
        .map(|s| {
            s.iter()
                .map(|x| match x {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every container (and init container) anywhere in a manifest: `command` + `args`, or the
/// script of `sh -c`.
fn k8s_commands(file: &Path, v: &serde_yaml::Value, out: &mut Vec<Found>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for key in ["containers", "initContainers"] {
                let Some(list) = m.get(key).and_then(|c| c.as_sequence()) else {
                    continue;
                };
                for c in list {
                    let mut env = BTreeMap::new();
                    for e in c
                        .get("env")
                        .and_then(|e| e.as_sequence())
                        .into_iter()
                        .flatten()
                    {
                        if let (Some(n), Some(val)) = (
                            e.get("name").and_then(|n| n.as_str()),
                            e.get("value").and_then(|n| n.as_str()),
                        ) {
                            env.insert(n.to_owned(), val.to_owned());
                        }
                    }
                    let argv: Vec<String> = yaml_strings(c.get("command"))
                        .into_iter()
                        .chain(yaml_strings(c.get("args")))
                        .map(|a| k8s_expand(&a, &env))
                        .collect();
                    let name = c.get("name").and_then(|n| n.as_str()).unwrap_or("?");
                    let line = 0;
                    if argv.first().is_some_and(|p| is_eqim_program(p)) {
                        out.push(Found {
                            file: file.join(name),
                            line,
                            argv,
                        });
                    } else if argv.len() >= 3 && argv[0].ends_with("sh") && argv[1] == "-c" {
                        out.extend(shell_commands(&file.join(name), &argv[2], 1));
                    }
                }
            }
            for (_, child) in m {
                k8s_commands(file, child, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|c| k8s_commands(file, c, out)),
        _ => {}
    }
}

fn files_under(dir: &Path, ext: &[&str], out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_under(&p, ext, out);
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ext.contains(&e))
        {
            out.push(p);
        }
    }
}

fn all_commands() -> Vec<Found> {
    let mut found = Vec::new();
    let mut files = Vec::new();
    files_under(&repo().join("configs/slurm"), &["sbatch", "sh"], &mut files);
    for f in &files {
        let text =
            std::fs::read_to_string(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
        found.extend(shell_commands(f, &text, 1));
    }
    let mut manifests = Vec::new();
    files_under(
        &repo().join("configs/kubernetes"),
        &["yaml", "yml"],
        &mut manifests,
    );
    for f in &manifests {
        let text =
            std::fs::read_to_string(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            k8s_commands(f, &v, &mut found);
        }
    }
    found
}

/// Parses with the binary's own parser; the error text is clap's.
fn parse(cmd: &Found) -> Result<(), String> {
    let result = match cmd.program() {
        "eqim" => eqim_worker::cli::Cli::try_parse_from(&cmd.argv).map(drop),
        "eqim-coordinator" => return parse_with_the_coordinator_binary(cmd),
        other => return Err(format!("unknown program {other}")),
    };
    result.map_err(|e| e.to_string())
}

/// The coordinator binary's own parser, run with its hidden `--check-args` (the worker crate does
/// not link the coordinator); the error text is clap's.
fn parse_with_the_coordinator_binary(cmd: &Found) -> Result<(), String> {
    let out = std::process::Command::new(support::coordinator::coordinator_binary())
        .args(&cmd.argv[1..])
        .arg("--check-args")
        .output()
        .map_err(|e| format!("running eqim-coordinator: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn every_command_line_in_the_cluster_recipes_parses() {
    let found = all_commands();
    let mut failures = Vec::new();
    for cmd in &found {
        if let Err(e) = parse(cmd) {
            let at = match cmd.line {
                0 => cmd.file.display().to_string(),
                n => format!("{}:{n}", cmd.file.display()),
            };
            failures.push(format!("{at}: {}\n  {}", cmd.argv.join(" "), e.trim()));
        }
    }
    assert!(
        failures.is_empty(),
        "command lines the eqim parsers reject:\n{}",
        failures.join("\n")
    );
    // The extraction itself must keep finding what the recipes run.
    let count = |file: &str, sub: &str| {
        found
            .iter()
            .filter(|c| {
                c.file.to_string_lossy().contains(file)
                    && c.argv.get(1).map_or("", String::as_str).starts_with(sub)
            })
            .count()
    };
    for (file, sub, what) in [
        ("eqim-train.sbatch", "--config", "the coordinator"),
        ("eqim-train.sbatch", "worker", "the workers"),
        ("eqim-eval.sbatch", "--config", "the evaluation coordinator"),
        ("eqim-eval.sbatch", "eval-worker", "the evaluation workers"),
        ("coordinator.yaml", "--config", "the coordinator Deployment"),
        ("workers.yaml", "worker", "the worker StatefulSet"),
        ("eval-job.yaml", "eval", "the evaluation Job"),
    ] {
        assert_eq!(
            count(file, sub),
            1,
            "expected one command line of {what} in {file}; found: {found:#?}"
        );
    }
}

#[test]
fn a_renamed_coordinator_flag_is_caught_by_the_coordinator_binary() {
    let found = all_commands();
    let coordinator = found
        .iter()
        .find(|c| c.program() == "eqim-coordinator")
        .expect("an eqim-coordinator command line");
    assert_eq!(parse(coordinator), Ok(()));
    let mut renamed = coordinator.clone();
    renamed.argv.push("--no-such-flag".into());
    let err = parse(&renamed).expect_err("an unknown flag must not parse");
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn a_renamed_flag_is_caught() {
    let found = all_commands();
    let worker = found
        .iter()
        .find(|c| c.argv.get(1).map(String::as_str) == Some("worker"))
        .expect("a worker command line");
    assert_eq!(parse(worker), Ok(()));
    let mut renamed = worker.clone();
    for a in &mut renamed.argv {
        if a == "--train-config" {
            *a = "--training-config".into();
        }
    }
    assert_ne!(
        renamed.argv, worker.argv,
        "the worker command line has --train-config"
    );
    let err = parse(&renamed).expect_err("an unknown flag must not parse");
    assert!(err.contains("--training-config"), "{err}");
}

#[test]
fn the_shell_reader_finds_commands_not_mentions() {
    let script = "command -v eqim >/dev/null || die \"eqim is not on PATH\"\n\
                  [ -x \"$EQIM_BIN/eqim\" ] || die x\n\
                  exec \"$EQIM_BIN/eqim-coordinator\" --port \"$EQIM_PORT\" \\\n  --job-dir \"$D\" &\n\
                  srun -N1 \"${STEP_GPUS[@]}\" \"$EQIM_BIN/eqim\" worker --host \"$node\" --threads $((4 / 2)) || rc=$?\n";
    let found = shell_commands(Path::new("t"), script, 1);
    let argv: Vec<Vec<String>> = found.iter().map(|f| f.argv.clone()).collect();
    assert_eq!(
        argv,
        vec![
            vec![
                "/opt/eqim/bin/eqim-coordinator",
                "--port",
                "29400",
                "--job-dir",
                "x"
            ],
            vec![
                "/opt/eqim/bin/eqim",
                "worker",
                "--host",
                "node1",
                "--threads",
                "9401"
            ],
        ]
    );
    assert_eq!(found[0].line, 3);
}
