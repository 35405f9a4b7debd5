//! BYOL's image augmentations, each a small function on an RGB image with values in [0, 1].
//!
//! Definitions follow torchvision's `transforms` (RandomResizedCrop, RandomHorizontalFlip,
//! ColorJitter, RandomGrayscale, GaussianBlur, RandomSolarize, Normalize); each function says
//! which formula it implements.

use anyhow::{Result, bail};
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// An RGB image, `height x width x 3`, row-major, channel last, values in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
}

impl Image {
    pub fn from_rgb8(width: usize, height: usize, rgb: &[u8]) -> Self {
        debug_assert_eq!(rgb.len(), width * height * 3);
        Image {
            width,
            height,
            pixels: rgb.iter().map(|&v| v as f32 / 255.0).collect(),
        }
    }

    fn at(&self, y: usize, x: usize, c: usize) -> f32 {
        self.pixels[(y * self.width + x) * 3 + c]
    }

    /// Applies `f` to every pixel's `[r, g, b]`.
    fn map_pixels(&mut self, f: impl Fn([f32; 3]) -> [f32; 3]) {
        for px in self.pixels.chunks_exact_mut(3) {
            let out = f([px[0], px[1], px[2]]);
            px.copy_from_slice(&out);
        }
    }
}

/// Everything random about one view.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    /// RandomResizedCrop area fraction range.
    pub crop_scale: [f32; 2],
    /// RandomResizedCrop aspect-ratio range.
    pub crop_ratio: [f32; 2],
    pub hflip_p: f32,
    /// Probability of applying colour jitter at all.
    pub jitter_p: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub grayscale_p: f32,
    pub blur_p: f32,
    pub blur_sigma: [f32; 2],
    pub solarize_p: f32,
}

/// The two views' settings (asymmetric in the paper).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    pub view1: ViewConfig,
    pub view2: ViewConfig,
}

impl AugmentConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("view1", &self.view1), ("view2", &self.view2)] {
            let field = |f: &str| format!("data.augment.{name}.{f}");
            let [s0, s1] = v.crop_scale;
            if !(0.0 < s0 && s0 <= s1 && s1 <= 1.0) {
                bail!(
                    "config field `{}` must satisfy 0 < min <= max <= 1",
                    field("crop_scale")
                );
            }
            let [r0, r1] = v.crop_ratio;
            if !(0.0 < r0 && r0 <= r1) {
                bail!(
                    "config field `{}` must satisfy 0 < min <= max",
                    field("crop_ratio")
                );
            }
            for (f, p) in [
                ("hflip_p", v.hflip_p),
                ("jitter_p", v.jitter_p),
                ("grayscale_p", v.grayscale_p),
                ("blur_p", v.blur_p),
                ("solarize_p", v.solarize_p),
            ] {
                if !(0.0..=1.0).contains(&p) {
                    bail!(
                        "config field `{}` is a probability: it must be within [0, 1]",
                        field(f)
                    );
                }
            }
            for (f, x) in [
                ("brightness", v.brightness),
                ("contrast", v.contrast),
                ("saturation", v.saturation),
            ] {
                if x.is_nan() || x < 0.0 {
                    bail!("config field `{}` must be >= 0", field(f));
                }
            }
            if !(0.0..=0.5).contains(&v.hue) {
                bail!("config field `{}` must be within [0, 0.5]", field("hue"));
            }
            let [b0, b1] = v.blur_sigma;
            if !(0.0 < b0 && b0 <= b1) {
                bail!(
                    "config field `{}` must satisfy 0 < min <= max",
                    field("blur_sigma")
                );
            }
        }
        Ok(())
    }
}

/// A crop box: top row, left column, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// torchvision `RandomResizedCrop.get_params`: up to ten tries of an area fraction drawn from
/// `scale` and a log-uniform aspect ratio from `ratio`; else a central crop with the ratio
/// clamped into range.
pub fn random_crop_box(
    rng: &mut impl Rng,
    height: usize,
    width: usize,
    scale: [f32; 2],
    ratio: [f32; 2],
) -> CropBox {
    let area = (height * width) as f32;
    let (log_r0, log_r1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target_area = area * rng.random_range(scale[0]..=scale[1]);
        let aspect = rng.random_range(log_r0..=log_r1).exp();
        let w = (target_area * aspect).sqrt().round() as usize;
        let h = (target_area / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f32 / height as f32;
    let (w, h) = if in_ratio < ratio[0] {
        (width, (width as f32 / ratio[0]).round() as usize)
    } else if in_ratio > ratio[1] {
        ((height as f32 * ratio[1]).round() as usize, height)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// Crops `image` to `crop` and resizes it to `size x size` bilinearly, sampling at pixel centres
/// (`align_corners=False`, torchvision's default).
pub fn resized_crop(image: &Image, crop: CropBox, size: usize) -> Image {
    let mut pixels = Vec::with_capacity(size * size * 3);
    let sy = crop.height as f32 / size as f32;
    let sx = crop.width as f32 / size as f32;
    let coord = |dst: usize, scale: f32, len: usize| {
        let src = ((dst as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(len - 1);
        let i1 = (i0 + 1).min(len - 1);
        (i0, i1, src - i0 as f32)
    };
    for y in 0..size {
        let (y0, y1, fy) = coord(y, sy, crop.height);
        for x in 0..size {
            let (x0, x1, fx) = coord(x, sx, crop.width);
            for c in 0..3 {
                let p = |yy: usize, xx: usize| image.at(crop.top + yy, crop.left + xx, c);
                let top = p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx;
                let bottom = p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx;
                pixels.push(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
    Image {
        width: size,
        height: size,
        pixels,
    }
}

/// Mirrors the image left to right.
pub fn hflip(image: &mut Image) {
    let w = image.width;
    for row in image.pixels.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

/// ITU-R 601-2 luma, as torchvision's `rgb_to_grayscale`.
pub fn luma([r, g, b]: [f32; 3]) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

/// Replaces every pixel by its luma on all three channels.
pub fn grayscale(image: &mut Image) {
    image.map_pixels(|px| [luma(px); 3]);
}

/// torchvision `_blend`: `factor * img + (1 - factor) * other`, clamped to [0, 1].
fn blend(x: f32, other: f32, factor: f32) -> f32 {
    (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)
}

/// `adjust_brightness`: blend with black.
pub fn adjust_brightness(image: &mut Image, factor: f32) {
    image.map_pixels(|px| px.map(|v| blend(v, 0.0, factor)));
}

/// `adjust_contrast`: blend with the mean luma of the whole image.
pub fn adjust_contrast(image: &mut Image, factor: f32) {
    let n = (image.width * image.height) as f32;
    let mean = image
        .pixels
        .chunks_exact(3)
        .map(|p| luma([p[0], p[1], p[2]]))
        .sum::<f32>()
        / n;
    image.map_pixels(|px| px.map(|v| blend(v, mean, factor)));
}

/// `adjust_saturation`: blend with the pixel's own luma.
pub fn adjust_saturation(image: &mut Image, factor: f32) {
    image.map_pixels(|px| {
        let l = luma(px);
        px.map(|v| blend(v, l, factor))
    });
}

/// RGB to HSV with all three in [0, 1], as torchvision's `_rgb2hsv`.
pub fn rgb_to_hsv([r, g, b]: [f32; 3]) -> [f32; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    let s = if max > 0.0 { delta / max } else { 0.0 };
    let h = if delta == 0.0 {
        0.0
    } else if max == r {
        ((g - b) / delta).rem_euclid(6.0) / 6.0
    } else if max == g {
        ((b - r) / delta + 2.0) / 6.0
    } else {
        ((r - g) / delta + 4.0) / 6.0
    };
    [h, s, max]
}

/// HSV to RGB, the inverse of [`rgb_to_hsv`].
pub fn hsv_to_rgb([h, s, v]: [f32; 3]) -> [f32; 3] {
    let h6 = h.rem_euclid(1.0) * 6.0;
    let sector = (h6.floor() as usize) % 6;
    let f = h6 - h6.floor();
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match sector {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// `adjust_hue`: rotate the hue by `shift` turns (in [-0.5, 0.5]).
pub fn adjust_hue(image: &mut Image, shift: f32) {
    image.map_pixels(|px| {
        let [h, s, v] = rgb_to_hsv(px);
        hsv_to_rgb([(h + shift).rem_euclid(1.0), s, v])
    });
}

/// `RandomSolarize`: values at or above `threshold` become `1 - value`.
pub fn solarize(image: &mut Image, threshold: f32) {
    image.map_pixels(|px| px.map(|v| if v >= threshold { 1.0 - v } else { v }));
}

/// Odd kernel side of about 10% of the image side (23 at 224, as the paper), at least 3.
pub fn blur_kernel_size(side: usize) -> usize {
    let k = (side as f32 * 0.1).round() as usize;
    (k | 1).max(3)
}

/// torchvision `gaussian_blur`: a separable normalised Gaussian of `kernel` taps with
/// standard deviation `sigma`, reflect padding at the borders.
pub fn gaussian_blur(image: &mut Image, kernel: usize, sigma: f32) {
    let half = (kernel / 2) as isize;
    let weights: Vec<f32> = (-half..=half)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = weights.iter().sum();
    let weights: Vec<f32> = weights.iter().map(|w| w / total).collect();
    let reflect = |i: isize, len: usize| -> usize {
        let len = len as isize;
        let mut i = i;
        if len == 1 {
            return 0;
        }
        while i < 0 || i >= len {
            i = if i < 0 { -i } else { 2 * (len - 1) - i };
        }
        i as usize
    };
    let (w, h) = (image.width, image.height);
    let mut tmp = vec![0.0f32; image.pixels.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                tmp[(y * w + x) * 3 + c] = weights
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| wt * image.at(y, reflect(x as isize + k as isize - half, w), c))
                    .sum();
            }
        }
    }
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                image.pixels[(y * w + x) * 3 + c] = weights
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| {
                        wt * tmp[(reflect(y as isize + k as isize - half, h) * w + x) * 3 + c]
                    })
                    .sum();
            }
        }
    }
}

/// `ColorJitter`: factors drawn uniformly from `[max(0, 1 - x), 1 + x]` (hue from
/// `[-hue, hue]`), the four adjustments applied in a random order.
pub fn color_jitter(image: &mut Image, rng: &mut impl Rng, view: &ViewConfig) {
    let mut order = [0usize, 1, 2, 3];
    order.shuffle(rng);
    let factor = |rng: &mut dyn rand::RngCore, x: f32| {
        if x > 0.0 {
            rng.random_range((1.0 - x).max(0.0)..=1.0 + x)
        } else {
            1.0
        }
    };
    for op in order {
        match op {
            0 if view.brightness > 0.0 => adjust_brightness(image, factor(rng, view.brightness)),
            1 if view.contrast > 0.0 => adjust_contrast(image, factor(rng, view.contrast)),
            2 if view.saturation > 0.0 => adjust_saturation(image, factor(rng, view.saturation)),
            3 if view.hue > 0.0 => adjust_hue(image, rng.random_range(-view.hue..=view.hue)),
            _ => {}
        }
    }
}

/// One random view of `image` at `size x size`, in BYOL's order: crop, flip, colour jitter,
/// grayscale, blur, solarize. Values stay in [0, 1]; normalisation happens when batching.
pub fn random_view(image: &Image, size: usize, view: &ViewConfig, rng: &mut impl Rng) -> Image {
    let crop = random_crop_box(
        rng,
        image.height,
        image.width,
        view.crop_scale,
        view.crop_ratio,
    );
    let mut out = resized_crop(image, crop, size);
    if rng.random::<f32>() < view.hflip_p {
        hflip(&mut out);
    }
    if rng.random::<f32>() < view.jitter_p {
        color_jitter(&mut out, rng, view);
    }
    if rng.random::<f32>() < view.grayscale_p {
        grayscale(&mut out);
    }
    if rng.random::<f32>() < view.blur_p {
        let sigma = rng.random_range(view.blur_sigma[0]..=view.blur_sigma[1]);
        gaussian_blur(&mut out, blur_kernel_size(size), sigma);
    }
    if rng.random::<f32>() < view.solarize_p {
        solarize(&mut out, 0.5);
    }
    out
}

/// Per-channel normalisation `(x - mean) / std`, written channel-first (`3 x H x W`) into `out`,
/// the layout the network takes.
pub fn normalize_into_chw(image: &Image, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = image.width * image.height;
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] - mean[c]) / std[c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn solid(w: usize, h: usize, rgb: [f32; 3]) -> Image {
        Image {
            width: w,
            height: h,
            pixels: (0..w * h).flat_map(|_| rgb).collect(),
        }
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn grayscale_of_known_colours_uses_itu_601_weights() {
        let mut img = solid(2, 2, [1.0, 0.0, 0.0]);
        grayscale(&mut img);
        assert!(img.pixels.iter().all(|&v| close(v, 0.299)));
        let mut img = solid(1, 1, [0.2, 0.4, 0.6]);
        grayscale(&mut img);
        assert!(close(
            img.pixels[0],
            0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6
        ));
    }

    #[test]
    fn solarize_inverts_from_the_threshold_up() {
        let mut img = Image {
            width: 1,
            height: 1,
            pixels: vec![0.49, 0.5, 0.9],
        };
        solarize(&mut img, 0.5);
        assert_eq!(img.pixels, vec![0.49, 0.5, 1.0 - 0.9]);
    }

    #[test]
    fn hflip_mirrors_columns_and_twice_is_identity() {
        let img = Image {
            width: 3,
            height: 1,
            pixels: (0..9).map(|v| v as f32).collect(),
        };
        let mut flipped = img.clone();
        hflip(&mut flipped);
        assert_eq!(
            flipped.pixels,
            vec![6.0, 7.0, 8.0, 3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
        );
        hflip(&mut flipped);
        assert_eq!(flipped, img);
    }

    #[test]
    fn hue_shift_of_pure_colours_moves_round_the_wheel() {
        let mut img = solid(1, 1, [1.0, 0.0, 0.0]);
        adjust_hue(&mut img, 1.0 / 3.0);
        assert!(
            img.pixels
                .iter()
                .zip([0.0, 1.0, 0.0])
                .all(|(a, b)| close(*a, b)),
            "{:?}",
            img.pixels
        );
        let mut img = solid(1, 1, [1.0, 0.0, 0.0]);
        adjust_hue(&mut img, -1.0 / 3.0);
        assert!(
            img.pixels
                .iter()
                .zip([0.0, 0.0, 1.0])
                .all(|(a, b)| close(*a, b)),
            "{:?}",
            img.pixels
        );
        for rgb in [[0.3, 0.6, 0.9], [0.9, 0.1, 0.4], [0.5, 0.5, 0.5]] {
            let back = hsv_to_rgb(rgb_to_hsv(rgb));
            assert!(
                back.iter().zip(rgb).all(|(a, b)| close(*a, b)),
                "{rgb:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn brightness_contrast_saturation_blend_as_torchvision() {
        let mut img = solid(1, 1, [0.2, 0.4, 0.6]);
        adjust_brightness(&mut img, 1.5);
        assert!(
            img.pixels
                .iter()
                .zip([0.3, 0.6, 0.9])
                .all(|(a, b)| close(*a, b))
        );
        // Contrast of a two-pixel image: blend with the mean luma.
        let mut img = Image {
            width: 2,
            height: 1,
            pixels: vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        };
        adjust_contrast(&mut img, 0.5);
        assert!(
            img.pixels
                .iter()
                .zip([0.25, 0.25, 0.25, 0.75, 0.75, 0.75])
                .all(|(a, b)| close(*a, b))
        );
        let mut img = solid(1, 1, [1.0, 0.0, 0.0]);
        adjust_saturation(&mut img, 0.0);
        assert!(img.pixels.iter().all(|&v| close(v, 0.299)));
    }

    #[test]
    fn crop_boxes_stay_inside_and_within_scale_and_ratio_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (h, w) = (32, 48);
        for _ in 0..2000 {
            let b = random_crop_box(&mut rng, h, w, [0.08, 1.0], [0.75, 4.0 / 3.0]);
            assert!(b.height >= 1 && b.width >= 1);
            assert!(b.top + b.height <= h && b.left + b.width <= w, "{b:?}");
            let area = (b.height * b.width) as f32 / (h * w) as f32;
            let ratio = b.width as f32 / b.height as f32;
            // Rounding to whole pixels moves both a little beyond the drawn values.
            let central = b.width == w || b.height == h;
            if !central {
                assert!(area > 0.08 * 0.7 && area <= 1.0, "{b:?} area {area}");
                assert!(
                    ratio > 0.75 * 0.8 && ratio < 4.0 / 3.0 * 1.25,
                    "{b:?} ratio {ratio}"
                );
            }
        }
    }

    #[test]
    fn full_image_crop_at_same_size_is_identity_and_upsampling_is_bilinear() {
        let img = Image {
            width: 2,
            height: 2,
            pixels: (0..12).map(|v| v as f32 / 12.0).collect(),
        };
        let same = resized_crop(
            &img,
            CropBox {
                top: 0,
                left: 0,
                height: 2,
                width: 2,
            },
            2,
        );
        assert!(
            same.pixels
                .iter()
                .zip(&img.pixels)
                .all(|(a, b)| close(*a, *b))
        );
        // 1x2 row upsampled to 4 wide: centres at -0.25, 0.25, 0.75, 1.25 in source pixels.
        let row = Image {
            width: 2,
            height: 1,
            pixels: vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        };
        let up = resized_crop(
            &row,
            CropBox {
                top: 0,
                left: 0,
                height: 1,
                width: 2,
            },
            4,
        );
        let red: Vec<f32> = up.pixels.chunks(3).map(|p| p[0]).take(4).collect();
        assert!(
            red.iter()
                .zip([0.0, 0.25, 0.75, 1.0])
                .all(|(a, b)| close(*a, b)),
            "{red:?}"
        );
    }

    #[test]
    fn blur_keeps_constant_images_and_its_kernel_sums_to_one() {
        let mut img = solid(8, 8, [0.3, 0.6, 0.9]);
        gaussian_blur(&mut img, 5, 1.5);
        assert!(
            img.pixels
                .chunks(3)
                .all(|p| close(p[0], 0.3) && close(p[1], 0.6) && close(p[2], 0.9))
        );
        // An impulse spreads symmetrically and keeps its mass away from the borders.
        let mut img = solid(9, 9, [0.0; 3]);
        img.pixels[(4 * 9 + 4) * 3] = 1.0;
        gaussian_blur(&mut img, 3, 1.0);
        let total: f32 = img.pixels.chunks(3).map(|p| p[0]).sum();
        assert!(close(total, 1.0), "{total}");
        assert!(close(img.at(4, 3, 0), img.at(4, 5, 0)) && close(img.at(3, 4, 0), img.at(5, 4, 0)));
        assert_eq!(blur_kernel_size(224), 23);
        assert_eq!(blur_kernel_size(32), 3);
    }

    #[test]
    fn normalisation_writes_channel_first() {
        let img = Image {
            width: 2,
            height: 1,
            pixels: vec![0.5, 0.2, 0.8, 1.0, 0.4, 0.0],
        };
        let mut out = vec![0.0; 6];
        normalize_into_chw(&img, [0.5, 0.2, 0.4], [0.5, 0.1, 0.4], &mut out);
        let want = [0.0, 1.0, 0.0, 2.0, 1.0, -1.0];
        assert!(out.iter().zip(want).all(|(a, b)| close(*a, b)), "{out:?}");
    }
}
