//! `eqim prepare-demo-data`: cuts the demo scene dataset out of photos that Debian packages ship
//! (unpacked by scripts/fetch-demo-data). Seeded square crops at several scales, resized to a
//! small size, written as `<out>/<class>/<n>.png` with `classes.txt` and a `manifest.json` that
//! records package versions, source and output sha256 and every crop box.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::{imageops, RgbImage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::folder::decode_rgb;
use super::resize::resize_fast;
use super::transform::{SampleRng, STREAM_DEMO_CROPS};

/// configs/demo-data.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoDataConfig {
    pub seed: u64,
    pub crop_size: u32,
    pub crops_per_photo: usize,
    pub min_scale: f64,
    pub max_scale: f64,
    pub photo: Vec<DemoPhoto>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DemoPhoto {
    /// Debian package the photo comes from.
    pub package: String,
    /// Path inside the package.
    pub path: String,
    pub class: String,
}

impl DemoDataConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading demo data config {}", path.display()))?;
        let cfg: Self = toml::from_str(&text)
            .with_context(|| format!("parsing demo data config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("invalid demo data config {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.crop_size == 0 || self.crops_per_photo == 0 {
            bail!("crop_size and crops_per_photo must be positive");
        }
        if !(0.0 < self.min_scale && self.min_scale <= self.max_scale && self.max_scale <= 1.0) {
            bail!(
                "need 0 < min_scale <= max_scale <= 1, got {} and {}",
                self.min_scale,
                self.max_scale
            );
        }
        if self.photo.is_empty() {
            bail!("no [[photo]] entries");
        }
        for p in &self.photo {
            let ok = !p.class.is_empty()
                && p.class
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                bail!(
                    "class '{}' of {} must be a plain folder name (letters, digits, _ and -)",
                    p.class,
                    p.path
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct PrepareDemoDataOptions {
    /// The photo list and crop settings.
    pub config: PathBuf,
    /// Folder with one unpacked tree per package (`<source>/<package>/usr/...`) and its version in
    /// `<source>/<package>.version` (scripts/fetch-demo-data makes both).
    pub source: PathBuf,
    /// Output folder; replaced atomically.
    pub out: PathBuf,
    /// Crop side in pixels (overrides the config's crop_size).
    pub size: Option<u32>,
    /// Crops per photo (overrides the config's crops_per_photo).
    pub crops: Option<usize>,
}

#[derive(Serialize)]
struct PackageRecord {
    name: String,
    version: String,
}

#[derive(Serialize)]
struct PhotoRecord {
    package: String,
    path: String,
    class: String,
    label: usize,
    width: u32,
    height: u32,
    sha256: String,
}

#[derive(Serialize)]
struct CropRecord {
    file: String,
    class: String,
    label: usize,
    photo: usize,
    /// [left, top, width, height] in the source photo.
    #[serde(rename = "box")]
    crop_box: [u32; 4],
    sha256: String,
}

#[derive(Serialize)]
struct Manifest {
    format: &'static str,
    seed: u64,
    crop_size: u32,
    crops_per_photo: usize,
    min_scale: f64,
    max_scale: f64,
    classes: Vec<String>,
    packages: Vec<PackageRecord>,
    photos: Vec<PhotoRecord>,
    crops: Vec<CropRecord>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The crop boxes of one photo: squares whose side is a uniform fraction of the shorter side.
pub fn crop_boxes(
    cfg: &DemoDataConfig,
    photo_index: usize,
    width: u32,
    height: u32,
) -> Vec<[u32; 4]> {
    let mut rng = SampleRng::new(cfg.seed, photo_index as u64, STREAM_DEMO_CROPS);
    let short = width.min(height) as f64;
    (0..cfg.crops_per_photo)
        .map(|_| {
            let scale = cfg.min_scale + (cfg.max_scale - cfg.min_scale) * rng.unit_f64();
            let side = ((short * scale).round() as u32).clamp(1, width.min(height));
            let left = rng.below((width - side + 1) as u64) as u32;
            let top = rng.below((height - side + 1) as u64) as u32;
            [left, top, side, side]
        })
        .collect()
}

fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("encoding a crop as PNG")?;
    Ok(bytes)
}

pub fn run(args: &PrepareDemoDataOptions) -> Result<()> {
    let mut cfg = DemoDataConfig::load(&args.config)?;
    if let Some(size) = args.size {
        cfg.crop_size = size;
    }
    if let Some(crops) = args.crops {
        cfg.crops_per_photo = crops;
    }
    cfg.validate().context("invalid --size or --crops")?;
    let manifest = build(&cfg, &args.source, &args.out)?;
    eprintln!(
        "wrote {} crops of {}x{} px in {} classes ({}) from {} photos to {}",
        manifest.crops.len(),
        cfg.crop_size,
        cfg.crop_size,
        manifest.classes.len(),
        manifest.classes.join(", "),
        manifest.photos.len(),
        args.out.display()
    );
    Ok(())
}

fn build(cfg: &DemoDataConfig, source: &Path, out: &Path) -> Result<Manifest> {
    let classes: Vec<String> = cfg
        .photo
        .iter()
        .map(|p| p.class.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let packages = package_records(cfg, source)?;
    let staging = out.with_extension(format!("tmp-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing stale {}", staging.display()))?;
    }
    for class in &classes {
        std::fs::create_dir_all(staging.join(class))
            .with_context(|| format!("creating {}", staging.join(class).display()))?;
    }
    let mut next_in_class = vec![0usize; classes.len()];
    let (mut photos, mut crops) = (Vec::new(), Vec::new());
    for (photo_index, photo) in cfg.photo.iter().enumerate() {
        let path = source.join(&photo.package).join(&photo.path);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (is package {} unpacked and the path right?)",
                path.display(),
                photo.package
            )
        })?;
        let img = decode_rgb(&path).with_context(|| format!("decoding {}", path.display()))?;
        let label = classes
            .iter()
            .position(|c| *c == photo.class)
            .expect("class list is built from the photos");
        for crop_box in crop_boxes(cfg, photo_index, img.width(), img.height()) {
            let [left, top, w, h] = crop_box;
            let region = imageops::crop_imm(&img, left, top, w, h).to_image();
            let small = resize_fast(&region, cfg.crop_size, cfg.crop_size);
            let png = encode_png(&small)?;
            let file = format!("{}/{:05}.png", photo.class, next_in_class[label]);
            next_in_class[label] += 1;
            write_file(&staging.join(&file), &png)?;
            crops.push(CropRecord {
                file,
                class: photo.class.clone(),
                label,
                photo: photo_index,
                crop_box,
                sha256: sha256_hex(&png),
            });
        }
        photos.push(PhotoRecord {
            package: photo.package.clone(),
            path: photo.path.clone(),
            class: photo.class.clone(),
            label,
            width: img.width(),
            height: img.height(),
            sha256: sha256_hex(&bytes),
        });
    }
    let manifest = Manifest {
        format: "eqim-demo-data-v1",
        seed: cfg.seed,
        crop_size: cfg.crop_size,
        crops_per_photo: cfg.crops_per_photo,
        min_scale: cfg.min_scale,
        max_scale: cfg.max_scale,
        classes: classes.clone(),
        packages,
        photos,
        crops,
    };
    write_manifest(&manifest, &staging)?;
    replace_dir(&staging, out)?;
    Ok(manifest)
}

/// The packages the photos come from, with the versions scripts/fetch-demo-data recorded.
fn package_records(cfg: &DemoDataConfig, source: &Path) -> Result<Vec<PackageRecord>> {
    let mut packages = Vec::new();
    for name in cfg
        .photo
        .iter()
        .map(|p| &p.package)
        .collect::<BTreeSet<_>>()
    {
        let version_file = source.join(format!("{name}.version"));
        let version = std::fs::read_to_string(&version_file)
            .with_context(|| {
                format!(
                    "reading {} (run scripts/fetch-demo-data, which unpacks the packages)",
                    version_file.display()
                )
            })?
            .trim()
            .to_string();
        packages.push(PackageRecord {
            name: name.clone(),
            version,
        });
    }
    Ok(packages)
}

/// `classes.txt` and `manifest.json` in the staging folder.
fn write_manifest(manifest: &Manifest, staging: &Path) -> Result<()> {
    write_file(
        &staging.join("classes.txt"),
        format!("{}\n", manifest.classes.join("\n")).as_bytes(),
    )?;
    let json = serde_json::to_vec_pretty(manifest).context("serialising the manifest")?;
    write_file(&staging.join("manifest.json"), &json)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Swaps the finished staging folder in for `out`, so readers never see a half-written dataset.
fn replace_dir(staging: &Path, out: &Path) -> Result<()> {
    // Flush the files before the rename publishes them.
    for entry in walk_files(staging)? {
        std::fs::File::open(&entry)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", entry.display()))?;
    }
    if out.exists() {
        let old = out.with_extension(format!("old-{}", std::process::id()));
        std::fs::rename(out, &old).with_context(|| format!("moving aside {}", out.display()))?;
        std::fs::rename(staging, out).with_context(|| format!("publishing {}", out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::rename(staging, out).with_context(|| format!("publishing {}", out.display()))?;
    }
    Ok(())
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.is_dir() {
            files.extend(walk_files(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DemoDataConfig {
        DemoDataConfig {
            seed: 5,
            crop_size: 8,
            crops_per_photo: 6,
            min_scale: 0.2,
            max_scale: 0.9,
            photo: vec![
                DemoPhoto {
                    package: "pkg-b".into(),
                    path: "usr/share/b.png".into(),
                    class: "water".into(),
                },
                DemoPhoto {
                    package: "pkg-a".into(),
                    path: "usr/share/a.jpg".into(),
                    class: "forest".into(),
                },
            ],
        }
    }

    #[test]
    fn crop_boxes_fit_the_photo_and_are_seeded() {
        let cfg = config();
        let boxes = crop_boxes(&cfg, 0, 120, 80);
        assert_eq!(boxes, crop_boxes(&cfg, 0, 120, 80));
        assert_ne!(boxes, crop_boxes(&cfg, 1, 120, 80));
        for [l, t, w, h] in boxes.iter().copied() {
            assert_eq!(w, h);
            assert!(l + w <= 120 && t + h <= 80);
            assert!((16..=72).contains(&w), "side {w} outside the scale range");
        }
    }

    #[test]
    fn builds_class_folders_manifest_and_class_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("src");
        for (pkg, rel, fmt) in [
            ("pkg-b", "usr/share/b.png", image::ImageFormat::Png),
            ("pkg-a", "usr/share/a.jpg", image::ImageFormat::Jpeg),
        ] {
            let path = source.join(pkg).join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
            img.save_with_format(&path, fmt).expect("save");
            std::fs::write(source.join(format!("{pkg}.version")), "1.0-1\n").expect("version");
        }
        let out = dir.path().join("out");
        let manifest = build(&config(), &source, &out).expect("build");
        assert_eq!(manifest.classes, vec!["forest", "water"]);
        assert_eq!(manifest.crops.len(), 12);
        assert_eq!(
            std::fs::read_to_string(out.join("classes.txt")).expect("classes"),
            "forest\nwater\n"
        );
        let folder = super::super::ImageFolder::open(&out).expect("open as dataset");
        assert_eq!(folder.len(), 12);
        assert_eq!(folder.label(0), 0);
        let crop = &manifest.crops[0];
        let png = std::fs::read(out.join(&crop.file)).expect("crop file");
        assert_eq!(sha256_hex(&png), crop.sha256);
        let decoded = decode_rgb(&out.join(&crop.file)).expect("decode crop");
        assert_eq!(decoded.dimensions(), (8, 8));
        // A rebuild replaces the folder and gives the same bytes.
        let again = build(&config(), &source, &out).expect("rebuild");
        assert_eq!(again.crops[5].sha256, manifest.crops[5].sha256);
    }
}
