//! Contact sheets: rows of images (of any widths) pasted onto one canvas, upscaled with nearest
//! neighbour so small demo images stay readable. Used for the demo's `summary.png`.

use anyhow::{Context, Result};
use image::{imageops, Rgb, RgbImage};
use std::path::Path;

/// Layout of a contact sheet.
#[derive(Debug, Clone, Copy)]
pub struct SheetLayout {
    /// Integer upscaling factor applied to every image.
    pub scale: u32,
    /// Pixels between images and around the border (after scaling).
    pub gap: u32,
    /// Extra pixels between rows that belong to different groups.
    pub group_gap: u32,
    pub background: [u8; 3],
}

impl Default for SheetLayout {
    fn default() -> Self {
        Self {
            scale: 3,
            gap: 4,
            group_gap: 12,
            background: [24, 24, 24],
        }
    }
}

/// One row of a sheet; `new_group` puts extra space above it.
pub struct SheetRow {
    pub images: Vec<RgbImage>,
    pub new_group: bool,
}

/// Pastes `rows` top to bottom, each row left to right.
pub fn compose(rows: &[SheetRow], layout: &SheetLayout) -> RgbImage {
    let s = layout.scale.max(1);
    let row_width = |r: &SheetRow| -> u32 {
        r.images
            .iter()
            .map(|i| i.width() * s + layout.gap)
            .sum::<u32>()
            + layout.gap
    };
    let row_height = |r: &SheetRow| r.images.iter().map(|i| i.height() * s).max().unwrap_or(0);
    let width = rows
        .iter()
        .map(row_width)
        .max()
        .unwrap_or(layout.gap)
        .max(1);
    let height = rows
        .iter()
        .map(|r| row_height(r) + layout.gap + if r.new_group { layout.group_gap } else { 0 })
        .sum::<u32>()
        + layout.gap;
    let mut canvas = RgbImage::from_pixel(width, height.max(1), Rgb(layout.background));
    let mut y = layout.gap;
    for row in rows {
        if row.new_group {
            y += layout.group_gap;
        }
        let mut x = layout.gap;
        for img in &row.images {
            let big = imageops::resize(
                img,
                img.width() * s,
                img.height() * s,
                imageops::FilterType::Nearest,
            );
            imageops::replace(&mut canvas, &big, i64::from(x), i64::from(y));
            x += big.width() + layout.gap;
        }
        y += row_height(row) + layout.gap;
    }
    canvas
}

/// Reads an image file as RGB8, naming the file in the error.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    Ok(image::open(path)
        .with_context(|| format!("reading image {}", path.display()))?
        .to_rgb8())
}

/// Writes a PNG atomically.
pub use crate::imageio::write_png;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_land_scaled_at_their_grid_positions() {
        let red = RgbImage::from_pixel(2, 2, Rgb([255, 0, 0]));
        let blue = RgbImage::from_pixel(4, 2, Rgb([0, 0, 255]));
        let layout = SheetLayout {
            scale: 2,
            gap: 1,
            group_gap: 3,
            background: [0, 0, 0],
        };
        let rows = vec![
            SheetRow {
                images: vec![red.clone(), blue.clone()],
                new_group: false,
            },
            SheetRow {
                images: vec![blue],
                new_group: true,
            },
        ];
        let sheet = compose(&rows, &layout);
        // Row 0 is 1 + 4 + 1 + 8 + 1 wide; height 1 + 4 + 1 + 3 + 4 + 1.
        assert_eq!((sheet.width(), sheet.height()), (15, 14));
        assert_eq!(sheet.get_pixel(1, 1).0, [255, 0, 0]);
        assert_eq!(sheet.get_pixel(4, 4).0, [255, 0, 0]);
        assert_eq!(sheet.get_pixel(5, 1).0, [0, 0, 0], "gap between images");
        assert_eq!(sheet.get_pixel(6, 1).0, [0, 0, 255]);
        assert_eq!(sheet.get_pixel(1, 8).0, [0, 0, 0], "group gap");
        assert_eq!(sheet.get_pixel(1, 9).0, [0, 0, 255]);
    }
}
