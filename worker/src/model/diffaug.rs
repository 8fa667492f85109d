//! Differentiable augmentation for the DINO discriminator's inputs (StyleGAN-T's `DiffAug`):
//! random translation by up to 1/8 of the size (zero border), brightness/saturation/contrast
//! jitter, and a cutout square, each image with its own draws. Warm-up blur is not used by the
//! tokenizer (schedule 0) and is not implemented.
//! Upstream: `tokenizer/modules/discriminator/diffaug.py`.

use tch::{Device, Kind, Tensor};

/// `DiffAug(prob, cutout)`; the tokenizer uses prob 1, cutout 0.2.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiffAug {
    pub prob: f64,
    pub cutout: f64,
}

impl Default for DiffAug {
    fn default() -> Self {
        Self {
            prob: 1.0,
            cutout: 0.2,
        }
    }
}

/// Python's `round` (ties to even), which sizes the shift range and the cutout.
fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// Which of the three augmentations run (`torch.rand(3) <= prob`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AugFlags {
    pub translate: bool,
    pub color: bool,
    pub cutout: bool,
}

impl DiffAug {
    /// Augments [B, C, H, W] with fresh random draws.
    pub fn aug(&self, xs: &Tensor) -> Tensor {
        let xs = xs.to_kind(Kind::Float);
        if self.prob < 1e-6 {
            return xs;
        }
        let flags = Tensor::rand([3], (Kind::Float, Device::Cpu)).le(self.prob);
        let flag = |i: i64| flags.int64_value(&[i]) != 0;
        let flags = AugFlags {
            translate: flag(0),
            color: flag(1),
            cutout: flag(2) && self.prob > 0.0,
        };
        let b = xs.size()[0];
        let rand01 = Tensor::rand([7, b, 1, 1], (Kind::Float, xs.device()));
        self.aug_with(&xs, flags, &rand01)
    }

    /// The augmentation for given draws `rand01` [7, B, 1, 1] in [0, 1) (rows: shift h, shift w,
    /// brightness, saturation, contrast, cutout h, cutout w).
    pub fn aug_with(&self, xs: &Tensor, flags: AugFlags, rand01: &Tensor) -> Tensor {
        let size = xs.size();
        let (b, h, w) = (size[0], size[2], size[3]);
        let dev = xs.device();
        let mut xs = xs.shallow_clone();
        let grid = |n: i64| Tensor::arange(n, (Kind::Int64, dev));
        let batch_index = grid(b).view([b, 1, 1]);
        if flags.translate {
            let (dh, dw) = (py_round(h as f64 * 0.125), py_round(w as f64 * 0.125));
            let shift_h = (rand01.get(0) * (2 * dh + 1) as f64)
                .floor()
                .to_kind(Kind::Int64)
                - dh;
            let shift_w = (rand01.get(1) * (2 * dw + 1) as f64)
                .floor()
                .to_kind(Kind::Int64)
                - dw;
            // [B, H, 1] and [B, 1, W] indices into the 1-px zero-padded image
            let gh = (grid(h).view([1, h, 1]) + shift_h + 1).clamp(0, h + 1);
            let gw = (grid(w).view([1, 1, w]) + shift_w + 1).clamp(0, w + 1);
            let padded = xs.constant_pad_nd([1, 1, 1, 1]).permute([0, 2, 3, 1]); // [B, H+2, W+2, C]
            xs = padded
                .index(&[Some(batch_index.shallow_clone()), Some(gh), Some(gw)])
                .permute([0, 3, 1, 2]) // [B, C, H, W]
                .contiguous();
        }
        if flags.color {
            xs = &xs + (rand01.get(2).unsqueeze(-1) - 0.5);
            let mean = xs.mean_dim(1, true, Kind::Float);
            xs = (&xs - &mean) * (rand01.get(3).unsqueeze(-1) * 2.0) + &mean;
            let mean = xs.mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float);
            xs = (&xs - &mean) * (rand01.get(4).unsqueeze(-1) + 0.5) + &mean;
        }
        if flags.cutout {
            let (ch, cw) = (
                py_round(h as f64 * self.cutout),
                py_round(w as f64 * self.cutout),
            );
            let off_h = (rand01.get(5) * (h + (1 - ch % 2)) as f64)
                .floor()
                .to_kind(Kind::Int64);
            let off_w = (rand01.get(6) * (w + (1 - cw % 2)) as f64)
                .floor()
                .to_kind(Kind::Int64);
            let gh = (grid(ch).view([1, ch, 1]) + off_h - ch / 2).clamp(0, h - 1);
            let gw = (grid(cw).view([1, 1, cw]) + off_w - cw / 2).clamp(0, w - 1);
            let mut mask = Tensor::ones([b, h, w], (xs.kind(), dev));
            let zeros = Tensor::zeros([1], (xs.kind(), dev));
            let _ = mask.index_put_(&[Some(batch_index), Some(gh), Some(gw)], &zeros, false); // in place
            xs *= mask.unsqueeze(1);
        }
        xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_4x4() -> Tensor {
        // one image, one channel, values 1..16 row-major
        Tensor::arange_start(1, 17, (Kind::Float, Device::Cpu)).view([1, 1, 4, 4])
    }

    fn draws(v: [f64; 7]) -> Tensor {
        Tensor::from_slice(&v)
            .to_kind(Kind::Float)
            .view([7, 1, 1, 1])
    }

    #[test]
    fn translation_shifts_with_a_zero_border() {
        // H = W = 4: delta = round(0.5) = 0 (ties to even) → no shift possible
        let aug = DiffAug::default();
        let only = AugFlags {
            translate: true,
            color: false,
            cutout: false,
        };
        let x = image_4x4();
        let out = aug.aug_with(&x, only, &draws([0.99, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]));
        assert!(out.equal(&x));
        // 8×8: delta = 1; rand 0.99 → floor(0.99·3) − 1 = +1 row; rand 0 → −1 column
        let x = Tensor::arange_start(1, 65, (Kind::Float, Device::Cpu)).view([1, 1, 8, 8]);
        let out = aug.aug_with(&x, only, &draws([0.99, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]));
        let xv = Vec::<f32>::try_from(x.flatten(0, -1)).expect("f32");
        let ov = Vec::<f32>::try_from(out.flatten(0, -1)).expect("f32");
        for i in 0..8i64 {
            for j in 0..8i64 {
                // out[i][j] = x[i + 1][j − 1], zero outside
                let (si, sj) = (i + 1, j - 1);
                let want = if (0..8).contains(&si) && (0..8).contains(&sj) {
                    xv[(si * 8 + sj) as usize]
                } else {
                    0.0
                };
                assert_eq!(ov[(i * 8 + j) as usize], want, "({i}, {j})");
            }
        }
    }

    #[test]
    fn colour_jitter_matches_the_closed_form() {
        let aug = DiffAug::default();
        let only = AugFlags {
            translate: false,
            color: true,
            cutout: false,
        };
        // two channels at one pixel: a, b
        let x = Tensor::from_slice(&[0.2f32, -0.4]).view([1, 2, 1, 1]);
        let out = aug.aug_with(&x, only, &draws([0.0, 0.0, 0.7, 0.25, 0.9, 0.0, 0.0]));
        let (mut a, mut b) = (0.2f64 + 0.2, -0.4 + 0.2); // brightness +0.2
        let m = (a + b) / 2.0; // saturation ×0.5 around the channel mean
        a = (a - m) * 0.5 + m;
        b = (b - m) * 0.5 + m;
        let m = (a + b) / 2.0; // contrast ×1.4 around the image mean
        a = (a - m) * 1.4 + m;
        b = (b - m) * 1.4 + m;
        let got = Vec::<f32>::try_from(out.flatten(0, -1)).expect("f32");
        assert!((f64::from(got[0]) - a).abs() < 1e-6 && (f64::from(got[1]) - b).abs() < 1e-6);
    }

    #[test]
    fn cutout_zeroes_a_square_of_a_fifth_of_the_size() {
        let aug = DiffAug::default();
        let only = AugFlags {
            translate: false,
            color: false,
            cutout: true,
        };
        let x = Tensor::ones([1, 3, 10, 10], (Kind::Float, Device::Cpu));
        // cutout 2×2; offset = floor(0.5·(10 + 1)) = 5 → rows/cols 4..5
        let out = aug.aug_with(&x, only, &draws([0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]));
        let zeros = out.eq(0.0).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(zeros, 3 * 4);
        for (i, j) in [(4, 4), (4, 5), (5, 4), (5, 5)] {
            assert_eq!(out.double_value(&[0, 1, i, j]), 0.0);
        }
        // random draws keep the shape and pass gradients
        let xg = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = aug.aug(&xg);
        assert_eq!(y.size(), vec![2, 3, 16, 16]);
        y.sum(Kind::Float).backward();
        assert!(xg.grad().defined());
    }
}
