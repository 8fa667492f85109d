//! Data pipeline tests on images generated in a temp dir.

use std::path::Path;
use std::sync::Arc;

use image::{ImageFormat, Rgb, RgbImage};
use tch::{Kind, Tensor};

use super::latent_cache::{INDICES_KEY, LABELS_KEY, LATENTS_KEY};
use super::loader::load_batch;
use super::*;

/// A deterministic, position-dependent pattern, different per `seed`.
fn pattern(width: u32, height: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 11 + seed * 17) % 256) as u8,
            ((x * y + seed * 5) % 256) as u8,
        ])
    })
}

fn save(root: &Path, rel: &str, img: &RgbImage) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    let format = if rel.to_ascii_lowercase().ends_with(".png") {
        ImageFormat::Png
    } else {
        ImageFormat::Jpeg
    };
    img.save_with_format(&path, format).expect("save image");
}

/// Three classes given out of alphabetical order, PNG and JPEG, a nested folder and a non-image.
fn scene_tree(root: &Path) {
    save(root, "zebra/b.png", &pattern(48, 40, 1));
    save(root, "zebra/a.jpg", &pattern(40, 48, 2));
    save(root, "apple/x.png", &pattern(40, 40, 3));
    save(root, "mango/sub/deep.JPEG", &pattern(64, 36, 4));
    save(root, "mango/c.png", &pattern(36, 64, 5));
    std::fs::write(root.join("mango/notes.txt"), "not an image").expect("write");
}

fn train_32() -> ImageTransform {
    ImageTransform::new(TransformConfig::square(32), Augment::Train).expect("valid transform")
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).expect("float tensor")
}

#[test]
fn labels_follow_sorted_class_folders_and_sorted_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    scene_tree(dir.path());
    let folder = ImageFolder::open(dir.path()).expect("open");
    assert_eq!(folder.classes(), ["apple", "mango", "zebra"]);
    let names: Vec<String> = (0..folder.len())
        .map(|i| {
            let p = folder.path(i).strip_prefix(dir.path()).expect("under root");
            p.to_string_lossy().into_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "apple/x.png",
            "mango/c.png",
            "mango/sub/deep.JPEG",
            "zebra/a.jpg",
            "zebra/b.png"
        ]
    );
    assert_eq!(folder.labels(), vec![0, 1, 1, 2, 2]);
}

#[test]
fn imagenet_layout_reads_wnid_folders_under_the_split() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = "ILSVRC2012_train/data";
    save(
        dir.path(),
        &format!("{data}/n01530575/n01530575_1.JPEG"),
        &pattern(40, 40, 1),
    );
    save(
        dir.path(),
        &format!("{data}/n01440764/n01440764_9.JPEG"),
        &pattern(40, 40, 2),
    );
    save(
        dir.path(),
        &format!("{data}/n01440764/n01440764_10.JPEG"),
        &pattern(40, 40, 3),
    );
    let folder = ImageFolder::imagenet(dir.path(), "train").expect("open imagenet layout");
    assert_eq!(folder.classes(), ["n01440764", "n01530575"]);
    assert_eq!(folder.labels(), vec![0, 0, 1]);
    // Python's sorted(): "..._10" < "..._9".
    assert!(folder.path(0).ends_with("n01440764_10.JPEG"));
    let err = ImageFolder::imagenet(dir.path(), "validation").expect_err("no such split");
    assert!(err.to_string().contains("ILSVRC2012_validation"), "{err}");
}

#[test]
fn empty_class_and_missing_root_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = ImageFolder::open(dir.path().join("nope")).expect_err("missing root");
    assert!(missing.to_string().contains("does not exist"), "{missing}");
    let empty = ImageFolder::open(dir.path()).expect_err("no classes");
    assert!(
        empty.to_string().contains("no class sub-folders"),
        "{empty}"
    );
    std::fs::create_dir_all(dir.path().join("cats")).expect("mkdir");
    std::fs::write(dir.path().join("cats/readme.md"), "x").expect("write");
    let err = ImageFolder::open(dir.path()).expect_err("empty class");
    assert!(err.to_string().contains("cats"), "{err}");
}

#[test]
fn transform_gives_chw_in_unit_range_with_exact_extremes() {
    let t = train_32();
    let mut img = pattern(50, 40, 9);
    // Left half black, right half white, on a 32x32 image so no resize blurs the values.
    let mut bw = RgbImage::new(32, 32);
    for (x, _, px) in bw.enumerate_pixels_mut() {
        *px = if x < 16 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        };
    }
    let mut out = vec![0f32; t.output_len()];
    assert_eq!(t.output_shape(), [3, 32, 32]);
    t.apply(&bw, 0, 0, &mut out);
    let (lo, hi) = out
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    assert_eq!((lo, hi), (-1.0, 1.0));
    img.put_pixel(0, 0, Rgb([0, 128, 255]));
    t.apply(&img, 3, 4, &mut out);
    assert!(out.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(out.iter().any(|&v| v > 0.0) && out.iter().any(|&v| v < 0.0));
}

#[test]
fn augmentation_is_a_function_of_seed_and_index() {
    let t = train_32();
    let img = pattern(60, 40, 1); // resized to 48x32: 17 possible crop columns
    let run = |seed, index| {
        let mut out = vec![0f32; t.output_len()];
        t.apply(&img, seed, index, &mut out);
        out
    };
    assert_eq!(run(11, 5), run(11, 5));
    let params: Vec<_> = (0..64).map(|i| t.params(48, 32, 11, i)).collect();
    assert!(params.iter().all(|p| p.top == 0 && p.left <= 16));
    let flips = params.iter().filter(|p| p.flip).count();
    assert!((16..=48).contains(&flips), "{flips} flips of 64");
    let lefts: std::collections::HashSet<u32> = params.iter().map(|p| p.left).collect();
    assert!(lefts.len() > 8, "crops barely vary: {lefts:?}");
    let differing = (0..16).filter(|&i| run(11, i) != run(12, i)).count();
    assert!(differing > 8, "a new epoch seed changes most samples");
}

#[test]
fn flip_mirrors_the_center_view_and_eval_never_flips() {
    let img = pattern(32, 32, 7);
    let eval = ImageTransform::new(TransformConfig::square(32), Augment::Eval).expect("valid");
    let train = train_32();
    let mut center = vec![0f32; eval.output_len()];
    eval.apply(&img, 1, 1, &mut center);
    let mut other_seed = vec![0f32; eval.output_len()];
    eval.apply(&img, 99, 1, &mut other_seed);
    assert_eq!(center, other_seed, "eval ignores the seed");
    let mirrored = to_vec(&Tensor::from_slice(&center).view([3, 32, 32]).flip([2]));
    let (mut saw_plain, mut saw_flip) = (false, false);
    for index in 0..16 {
        let mut out = vec![0f32; train.output_len()];
        train.apply(&img, 5, index, &mut out);
        if train.params(32, 32, 5, index).flip {
            assert_eq!(out, mirrored);
            saw_flip = true;
        } else {
            assert_eq!(out, center);
            saw_plain = true;
        }
    }
    assert!(saw_plain && saw_flip);
}

#[test]
fn resize_then_center_crop_matches_hand_computed_geometry() {
    // 64x32: shorter side already 32, so the center crop is columns 16..48 exactly.
    let img = pattern(64, 32, 3);
    let eval = ImageTransform::new(TransformConfig::square(32), Augment::Eval).expect("valid");
    let mut out = vec![0f32; eval.output_len()];
    eval.apply(&img, 0, 0, &mut out);
    let expected = img.get_pixel(16 + 5, 7)[1] as f32 / 255.0;
    assert_eq!(out[32 * 32 + 7 * 32 + 5], (expected - 0.5) / 0.5);
    // Downscaling 128x64 -> 64x32 averages pixels: a 1-px checkerboard becomes flat grey.
    let checker = RgbImage::from_fn(128, 64, |x, y| {
        if (x + y) % 2 == 0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    eval.apply(&checker, 0, 0, &mut out);
    assert!(
        out.iter().all(|v| v.abs() < 0.1),
        "antialiased resize averages the checkerboard"
    );
}

#[test]
fn loader_batches_are_ordered_and_identical_to_single_thread_loading() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..22 {
        save(
            dir.path(),
            &format!("c{}/{i:03}.png", i % 3),
            &pattern(40 + i, 36, i),
        );
    }
    let folder = ImageFolder::open(dir.path()).expect("open");
    let dataset: Arc<dyn SampleSource> = Arc::new(ImageDataset::new(folder, train_32()));
    let order: Vec<usize> = (0..22).rev().collect();
    let config = LoaderConfig::with_seed(42).with_threads(3);
    let batches: Vec<Batch> = BatchLoader::from_indices(dataset.clone(), &order, 5, &config)
        .map(|b| b.expect("batch"))
        .collect();
    assert_eq!(batches.len(), 5);
    assert_eq!(batches[4].images.size(), [2, 3, 32, 32]);
    for (position, batch) in batches.iter().enumerate() {
        assert_eq!(batch.position, position);
        let expected_indices = &order[position * 5..(position * 5 + 5).min(22)];
        assert_eq!(batch.indices, expected_indices);
        let reference = load_batch(&*dataset, position, expected_indices, 42);
        assert!(batch.images.equal(&reference.images));
        assert!(batch.labels.equal(&reference.labels));
        assert_eq!(batch.labels.kind(), Kind::Int64);
    }
}

#[test]
fn corrupt_and_unreadable_files_are_skipped_warned_once_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    save(dir.path(), "a/0.png", &pattern(40, 40, 0));
    std::fs::write(dir.path().join("a/1.jpg"), b"this is not a jpeg").expect("write");
    save(dir.path(), "b/2.png", &pattern(40, 40, 2));
    let mut png = Vec::new();
    pattern(40, 40, 3)
        .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
        .expect("encode");
    std::fs::write(dir.path().join("b/3.png"), &png[..png.len() / 2]).expect("truncated");
    let folder = ImageFolder::open(dir.path()).expect("open");
    let dataset = Arc::new(ImageDataset::new(folder, train_32()));
    let before = unreadable_files_skipped();
    let config = LoaderConfig::with_seed(0).with_threads(2);
    for epoch in 0..2 {
        let batches: Vec<Batch> =
            BatchLoader::from_indices(dataset.clone(), &[0, 1, 2, 3], 2, &config)
                .map(|b| b.expect("a bad file never fails the loader"))
                .collect();
        assert_eq!(batches[0].indices, [0], "epoch {epoch}");
        assert_eq!(batches[0].skipped, [1]);
        assert_eq!(batches[1].indices, [2]);
        assert_eq!(batches[1].skipped, [3]);
        assert_eq!(batches[1].images.size(), [1, 3, 32, 32]);
    }
    // Counted once per file, not once per epoch.
    assert_eq!(unreadable_files_skipped() - before, 2);
    assert_eq!(dataset.unreadable_indices(), [1, 3]);
}

/// Stand-in tokenizer: 8x8 average pooling, one token per pixel column, [B, W/8, 3 * H/8].
fn pool_encode(images: &Tensor) -> Tensor {
    let pooled = images.avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None::<i64>);
    let (b, c, h, w) = pooled.size4().expect("4-D");
    pooled.permute([0, 3, 1, 2]).reshape([b, w, c * h])
}

#[test]
fn latent_cache_round_trips_bitwise_for_both_flips() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..7u32 {
        save(
            dir.path(),
            &format!("k{}/{i}.png", i % 2),
            &pattern(32 + 3 * i, 32, i),
        );
    }
    std::fs::write(dir.path().join("k0/9.jpg"), b"garbage").expect("write");
    let folder = ImageFolder::open(dir.path()).expect("open");
    let eval = ImageTransform::new(TransformConfig::square(32), Augment::Eval).expect("valid");
    let dataset = Arc::new(ImageDataset::new(folder, eval));
    let path = dir.path().join("latents.safetensors");
    let summary = LatentCacheWriter::new(3)
        .with_loader(LoaderConfig::with_seed(0).with_threads(2))
        .with_metadata("encoder", "avg_pool8")
        .write(dataset.clone(), &path, pool_encode)
        .expect("write cache");
    assert_eq!((summary.rows, summary.tokens, summary.channels), (7, 4, 12));
    assert_eq!(summary.skipped.len(), 1);

    let cache = LatentCache::open(&path).expect("open cache");
    assert_eq!(
        cache.metadata().get("encoder").map(String::as_str),
        Some("avg_pool8")
    );
    let rows: Vec<usize> = (0..cache.len()).collect();
    let sources: Vec<usize> = cache.source_indices().iter().map(|&i| i as usize).collect();
    let images = load_batch(&*dataset, 0, &sources, 0);
    assert_eq!(
        cache.labels(),
        Vec::<i64>::try_from(&images.labels).expect("labels")
    );
    let expected_plain = pool_encode(&images.images);
    let expected_mirror = pool_encode(&images.images.flip([3]));
    let (plain, labels) = cache.batch(&rows, &vec![false; rows.len()]).expect("read");
    let (mirror, _) = cache.batch(&rows, &vec![true; rows.len()]).expect("read");
    assert!(plain.equal(&expected_plain), "flip 0 round-trips bitwise");
    assert!(mirror.equal(&expected_mirror), "flip 1 round-trips bitwise");
    assert!(labels.equal(&images.labels));
    // Column tokens of a mirrored image are the original's in reverse order.
    assert!(mirror.allclose(&plain.flip([1]), 1e-6, 1e-6, false));

    // An independent safetensors reader sees the same tensors.
    let named = Tensor::read_safetensors(&path).expect("libtorch reads it as safetensors");
    let get = |k: &str| {
        named
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.shallow_clone())
            .expect(k)
    };
    assert_eq!(get(LATENTS_KEY).size(), [7, 2, 4, 12]);
    assert!(get(LATENTS_KEY).select(1, 1).equal(&expected_mirror));
    assert!(get(LABELS_KEY).equal(&images.labels));
    assert_eq!(
        Vec::<i64>::try_from(&get(INDICES_KEY)).expect("indices"),
        cache.source_indices()
    );

    // Seeded batches pick each row's flip deterministically and use both.
    let (a, _) = cache.batch_for_seed(&rows, 3).expect("seeded");
    let (b, _) = cache.batch_for_seed(&rows, 3).expect("seeded");
    assert!(a.equal(&b));
    let from_plain = (0..7).filter(|&r| a.get(r).equal(&plain.get(r))).count();
    assert!(
        from_plain > 0 && from_plain < 7,
        "uses both flips: {from_plain} of 7 plain"
    );
}

#[test]
fn latent_cache_rejects_foreign_and_truncated_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let foreign = dir.path().join("weights.safetensors");
    Tensor::write_safetensors(
        &[("w", Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)))],
        &foreign,
    )
    .expect("write");
    let err = LatentCache::open(&foreign).expect_err("not a latent cache");
    assert!(
        err.to_string().contains("not an eqim latent cache"),
        "{err}"
    );

    save(dir.path(), "c/0.png", &pattern(32, 32, 0));
    let eval = ImageTransform::new(TransformConfig::square(32), Augment::Eval).expect("valid");
    let dataset = Arc::new(ImageDataset::new(
        ImageFolder::open(dir.path()).expect("open"),
        eval,
    ));
    let path = dir.path().join("cache.safetensors");
    LatentCacheWriter::new(4)
        .write(dataset, &path, pool_encode)
        .expect("write");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 9]).expect("truncate");
    let err = LatentCache::open(&path).expect_err("truncated");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn latent_cache_writer_rejects_a_bad_encoder_and_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    save(dir.path(), "c/0.png", &pattern(32, 32, 0));
    let eval = ImageTransform::new(TransformConfig::square(32), Augment::Eval).expect("valid");
    let dataset = Arc::new(ImageDataset::new(
        ImageFolder::open(dir.path()).expect("open"),
        eval,
    ));
    let path = dir.path().join("cache.safetensors");
    let flat = |images: &Tensor| images.flatten(1, -1);
    let err = LatentCacheWriter::new(4)
        .write(dataset, &path, flat)
        .expect_err("2-D latents are refused");
    assert!(err.to_string().contains("[B, L, C]"), "{err}");
    assert!(!path.exists());
    assert!(!path.with_extension("safetensors.tmp").exists());
}
