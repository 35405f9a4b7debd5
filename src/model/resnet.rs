//! ResNet backbones (torchvision layout, classification head removed).
//!
//! Field names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `downsample`) so weights map
//! one to one onto a PyTorch state dict.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Which ResNet depth to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Resnet18,
    Resnet34,
    Resnet50,
}

/// The first layers: `cifar` keeps 32x32 inputs at full resolution (3x3 conv, stride 1, no
/// max-pool), `imagenet` is torchvision's 7x7 stride-2 conv followed by a max-pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    Cifar,
    Imagenet,
}

/// Everything needed to build a backbone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    pub architecture: Architecture,
    pub stem: Stem,
    /// Multiplies every channel count (64, 128, 256, 512 at width 1).
    pub width: f64,
}

impl Architecture {
    /// Blocks per stage and whether they are bottlenecks.
    fn stages(self) -> ([usize; 4], bool) {
        match self {
            Architecture::Resnet18 => ([2, 2, 2, 2], false),
            Architecture::Resnet34 => ([3, 4, 6, 3], false),
            Architecture::Resnet50 => ([3, 4, 6, 3], true),
        }
    }
}

impl BackboneConfig {
    /// Channels of the first stage; never below one.
    pub fn base_channels(&self) -> usize {
        ((64.0 * self.width).round() as usize).max(1)
    }

    /// Length of the feature vector the backbone outputs.
    pub fn feature_dim(&self) -> usize {
        let (_, bottleneck) = self.architecture.stages();
        self.base_channels() * 8 * if bottleneck { 4 } else { 1 }
    }

    pub fn init(&self, device: &Device) -> ResNet {
        let (blocks, bottleneck) = self.architecture.stages();
        let expansion = if bottleneck { 4 } else { 1 };
        let base = self.base_channels();
        let (conv1, maxpool) = match self.stem {
            Stem::Cifar => (conv(3, base, 3, 1, device), None),
            Stem::Imagenet => (
                conv(3, base, 7, 2, device),
                Some(
                    MaxPool2dConfig::new([3, 3])
                        .with_strides([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(),
                ),
            ),
        };
        let mut in_channels = base;
        let mut stages = Vec::with_capacity(4);
        for (stage, &count) in blocks.iter().enumerate() {
            let planes = base << stage;
            let mut layer = Vec::with_capacity(count);
            for index in 0..count {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let block = if bottleneck {
                    Block::Bottleneck(Bottleneck::new(in_channels, planes, stride, device))
                } else {
                    Block::Basic(BasicBlock::new(in_channels, planes, stride, device))
                };
                in_channels = planes * expansion;
                layer.push(block);
            }
            stages.push(layer);
        }
        let [layer1, layer2, layer3, layer4]: [Vec<Block>; 4] =
            stages.try_into().expect("four stages");
        ResNet {
            conv1,
            bn1: batch_norm(base, device),
            maxpool,
            layer1,
            layer2,
            layer3,
            layer4,
        }
    }
}

/// He-normal initialisation with fan-out, as torchvision initialises ResNet convolutions.
fn conv(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    device: &Device,
) -> Conv2d {
    let pad = kernel / 2;
    Conv2dConfig::new([in_channels, out_channels], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .with_initializer(Initializer::KaimingNormal {
            gain: std::f64::consts::SQRT_2,
            fan_out_only: true,
        })
        .init(device)
}

/// A convolution applied to an NCHW batch in the autocast precision: on flex through byol's
/// GEMM convolution (forward and gradients).
fn convolve(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    return super::fused::conv::forward(conv, x);
    #[cfg(not(feature = "flex"))]
    return super::precision::conv2d(conv, x);
}

/// A BatchNorm layer applied to an NCHW batch (fused on flex when training).
fn norm(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    return super::fused::batch_norm::forward(bn, x);
    #[cfg(not(feature = "flex"))]
    return bn.forward(x);
}

/// `relu(norm(bn, x) + residual)`, the end of a residual block, fused where [`norm`] is.
fn norm_add_relu(bn: &BatchNorm, x: Tensor<4>, residual: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    return super::fused::batch_norm::forward_add_relu(bn, x, residual);
    #[cfg(not(feature = "flex"))]
    return burn::tensor::activation::relu(bn.forward(x) + residual);
}

/// `convolve(conv, relu(norm(bn, x)))`, where the norm's output feeds nothing else: fused on flex
/// in training so that the backward keeps `x` only.
fn norm_relu_convolve(bn: &BatchNorm, x: Tensor<4>, conv: &Conv2d) -> Tensor<4> {
    #[cfg(feature = "flex")]
    return super::fused::norm_conv::norm_relu_conv(bn, x, conv);
    #[cfg(not(feature = "flex"))]
    return convolve(conv, burn::tensor::activation::relu(bn.forward(x)));
}

/// `relu(norm(bn, convolve(conv, x)))` for the stem: fused on flex in training so that the
/// backward keeps `x` (the images) and runs the three-channel convolution again.
fn convolve_norm_relu(conv: &Conv2d, bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    return super::fused::norm_conv::conv_norm_relu(conv, bn, x);
    #[cfg(not(feature = "flex"))]
    return burn::tensor::activation::relu(bn.forward(convolve(conv, x)));
}

fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels).init(device)
}

/// A 1x1 strided convolution and BatchNorm that match the shortcut to the block's output.
#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

impl Downsample {
    fn new_if_needed(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        device: &Device,
    ) -> Option<Self> {
        (stride != 1 || in_channels != out_channels).then(|| Downsample {
            conv: conv(in_channels, out_channels, 1, stride, device),
            bn: batch_norm(out_channels, device),
        })
    }

    fn shortcut(downsample: &Option<Self>, x: Tensor<4>) -> Tensor<4> {
        match downsample {
            Some(d) => norm(&d.bn, convolve(&d.conv, x)),
            None => x,
        }
    }
}

/// Two 3x3 convolutions with a residual connection (ResNet-18/34).
#[derive(Module, Debug)]
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub downsample: Option<Downsample>,
}

impl BasicBlock {
    fn new(in_channels: usize, planes: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv1: conv(in_channels, planes, 3, stride, device),
            bn1: batch_norm(planes, device),
            conv2: conv(planes, planes, 3, 1, device),
            bn2: batch_norm(planes, device),
            downsample: Downsample::new_if_needed(in_channels, planes, stride, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = Downsample::shortcut(&self.downsample, x.clone());
        let out = norm_relu_convolve(&self.bn1, convolve(&self.conv1, x), &self.conv2);
        norm_add_relu(&self.bn2, out, identity)
    }
}

/// 1x1 reduce, 3x3 (strided, as torchvision's "ResNet v1.5"), 1x1 expand by 4 (ResNet-50).
#[derive(Module, Debug)]
pub struct Bottleneck {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub conv3: Conv2d,
    pub bn3: BatchNorm,
    pub downsample: Option<Downsample>,
}

impl Bottleneck {
    fn new(in_channels: usize, planes: usize, stride: usize, device: &Device) -> Self {
        let out_channels = planes * 4;
        Self {
            conv1: conv(in_channels, planes, 1, 1, device),
            bn1: batch_norm(planes, device),
            conv2: conv(planes, planes, 3, stride, device),
            bn2: batch_norm(planes, device),
            conv3: conv(planes, out_channels, 1, 1, device),
            bn3: batch_norm(out_channels, device),
            downsample: Downsample::new_if_needed(in_channels, out_channels, stride, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = Downsample::shortcut(&self.downsample, x.clone());
        let out = norm_relu_convolve(&self.bn1, convolve(&self.conv1, x), &self.conv2);
        let out = norm_relu_convolve(&self.bn2, out, &self.conv3);
        norm_add_relu(&self.bn3, out, identity)
    }
}

#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // A handful per network; boxing buys nothing.
pub enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Block::Basic(block) => block.forward(x),
            Block::Bottleneck(block) => block.forward(x),
        }
    }
}

/// ResNet without its classifier: images `[N, 3, H, W]` to features `[N, feature_dim]`.
#[derive(Module, Debug)]
pub struct ResNet {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub maxpool: Option<MaxPool2d>,
    pub layer1: Vec<Block>,
    pub layer2: Vec<Block>,
    pub layer3: Vec<Block>,
    pub layer4: Vec<Block>,
}

impl ResNet {
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = convolve_norm_relu(&self.conv1, &self.bn1, images);
        if let Some(pool) = &self.maxpool {
            x = pool.forward(x);
        }
        for block in self
            .layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
        {
            x = block.forward(x);
        }
        // Global average pool.
        let [n, c, h, w] = x.dims();
        x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_of(architecture: Architecture, stem: Stem, size: usize) -> ([usize; 2], usize) {
        let config = BackboneConfig {
            architecture,
            stem,
            width: 0.125,
        };
        let device = Device::default();
        let net = config.init(&device);
        let x = Tensor::<4>::zeros([2, 3, size, size], &device);
        (net.forward(x).dims(), config.feature_dim())
    }

    #[test]
    fn every_backbone_and_stem_gives_its_feature_dim() {
        for architecture in [
            Architecture::Resnet18,
            Architecture::Resnet34,
            Architecture::Resnet50,
        ] {
            for (stem, size) in [(Stem::Cifar, 16), (Stem::Imagenet, 32)] {
                let (dims, feature_dim) = shape_of(architecture, stem, size);
                let expected = if architecture == Architecture::Resnet50 {
                    8 * 8 * 4
                } else {
                    8 * 8
                };
                assert_eq!(feature_dim, expected, "{architecture:?}");
                assert_eq!(dims, [2, expected], "{architecture:?} {stem:?}");
            }
        }
    }

    #[test]
    fn resnet18_full_width_has_torchvision_parameter_count() {
        // torchvision resnet18 without fc: 11,176,512 weights + BN affine; CIFAR stem replaces
        // the 7x7 conv1 (9,408) by a 3x3 one (1,728). Running statistics count here too.
        let config = BackboneConfig {
            architecture: Architecture::Resnet18,
            stem: Stem::Cifar,
            width: 1.0,
        };
        let net = config.init(&Device::default());
        let bn_running = 2
            * (64
                + 2 * (64 + 64)
                + 2 * 128
                + 128
                + 2 * 128
                + 2 * 256
                + 256
                + 2 * 256
                + 2 * 512
                + 512
                + 2 * 512);
        assert_eq!(net.num_params(), 11_168_832 + bn_running);
    }
}

impl BackboneConfig {
    /// Floating-point operations (2 per multiply-add) of one forward of a `size x size` image
    /// through the convolutions, as PyTorch's flop counter counts them (BatchNorm, ReLU and
    /// pooling are left out: they are a fraction of a percent).
    pub fn forward_flops(&self, size: usize) -> f64 {
        let conv = |cin: usize, cout: usize, k: usize, out: usize| {
            2.0 * (cin * k * k * cout * out * out) as f64
        };
        let (blocks, bottleneck) = self.architecture.stages();
        let base = self.base_channels();
        let mut side = size;
        let mut flops = match self.stem {
            Stem::Cifar => conv(3, base, 3, side),
            Stem::Imagenet => {
                side = side.div_ceil(2);
                let f = conv(3, base, 7, side);
                side = side.div_ceil(2);
                f
            }
        };
        let expansion = if bottleneck { 4 } else { 1 };
        let mut in_channels = base;
        for (stage, &count) in blocks.iter().enumerate() {
            let planes = base << stage;
            for index in 0..count {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let out_side = side.div_ceil(stride);
                let out_channels = planes * expansion;
                flops += if bottleneck {
                    conv(in_channels, planes, 1, side)
                        + conv(planes, planes, 3, out_side)
                        + conv(planes, out_channels, 1, out_side)
                } else {
                    conv(in_channels, planes, 3, out_side) + conv(planes, planes, 3, out_side)
                };
                if stride != 1 || in_channels != out_channels {
                    flops += conv(in_channels, out_channels, 1, out_side);
                }
                in_channels = out_channels;
                side = out_side;
            }
        }
        flops
    }
}

#[cfg(test)]
mod flop_tests {
    use super::*;

    #[test]
    fn resnet18_cifar_forward_is_the_published_1_11_gflop() {
        let config = BackboneConfig {
            architecture: Architecture::Resnet18,
            stem: Stem::Cifar,
            width: 1.0,
        };
        let gflop = config.forward_flops(32) / 1e9;
        assert!((gflop - 1.11).abs() < 0.01, "{gflop}");
        // torchvision's ResNet-50 at 224: 4.1 GMAC.
        let config = BackboneConfig {
            architecture: Architecture::Resnet50,
            stem: Stem::Imagenet,
            width: 1.0,
        };
        let gmac = config.forward_flops(224) / 2e9;
        assert!((gmac - 4.09).abs() < 0.05, "{gmac}");
    }
}
