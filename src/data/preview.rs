//! A picture of what the augmentations do: one row per image, original then the two views.

use super::augment::{AugmentConfig, Image, random_view};
use super::folder::Dataset;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Grid of `count` images (spread evenly over the dataset): columns original, view 1, view 2,
/// each scaled up `zoom` times (nearest neighbour), with a 2-pixel white gutter.
pub fn preview_grid(
    dataset: &Dataset,
    augment: &AugmentConfig,
    count: usize,
    zoom: usize,
    seed: u64,
) -> image::RgbImage {
    let count = count.clamp(1, dataset.len().max(1));
    let tile = dataset.size * zoom;
    let gutter = 2;
    let width = 3 * tile + 4 * gutter;
    let height = count * tile + (count + 1) * gutter;
    let mut grid =
        image::RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255, 255, 255]));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for row in 0..count {
        let original = dataset.image(row * dataset.len() / count);
        let views = [
            original.clone(),
            random_view(&original, dataset.size, &augment.view1, &mut rng),
            random_view(&original, dataset.size, &augment.view2, &mut rng),
        ];
        for (col, img) in views.iter().enumerate() {
            blit(
                &mut grid,
                img,
                gutter + col * (tile + gutter),
                gutter + row * (tile + gutter),
                zoom,
            );
        }
    }
    grid
}

fn blit(grid: &mut image::RgbImage, img: &Image, left: usize, top: usize, zoom: usize) {
    for y in 0..img.height * zoom {
        for x in 0..img.width * zoom {
            let i = ((y / zoom) * img.width + x / zoom) * 3;
            let px = [0, 1, 2].map(|c| (img.pixels[i + c].clamp(0.0, 1.0) * 255.0).round() as u8);
            grid.put_pixel((left + x) as u32, (top + y) as u32, image::Rgb(px));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;

    #[test]
    fn grid_has_three_columns_and_the_original_untouched() {
        let ds = Dataset {
            classes: vec!["a".into()],
            size: 4,
            pixels: (0..2 * 4 * 4 * 3).map(|v| (v * 5) as u8).collect(),
            labels: vec![0, 0],
            paths: vec![Default::default(); 2],
        };
        let augment = TrainConfig::preset("seed").unwrap().data.augment;
        let grid = preview_grid(&ds, &augment, 2, 2, 0);
        assert_eq!((grid.width(), grid.height()), (3 * 8 + 8, 2 * 8 + 6));
        // Top-left pixel of the first original tile is the first image's first pixel.
        assert_eq!(grid.get_pixel(2, 2).0, [0, 5, 10]);
    }
}
