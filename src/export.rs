//! Weights in and out as safetensors under PyTorch's names.
//!
//! The backbone uses torchvision's ResNet state-dict names (`conv1.weight`, `bn1.running_mean`,
//! `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, ...), so a torchvision ResNet with
//! the same stem loads the file with `load_state_dict(strict=False)`. Heads are named
//! `projector.0.weight` (first Linear), `projector.1.*` (BatchNorm), `projector.3.weight`
//! (second Linear), as the `nn.Sequential` of the article's MLP; Linear weights are transposed
//! to PyTorch's `[out, in]`.

use anyhow::{Context, Result, anyhow, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// PyTorch's name for a burn parameter path, and whether its value is a transposed Linear weight.
pub fn torch_name(path: &[String]) -> (String, bool) {
    let mut parts: Vec<&str> = Vec::with_capacity(path.len());
    let mut linear = false;
    for (i, part) in path.iter().enumerate() {
        let parent = i.checked_sub(1).map(|j| path[j].as_str());
        let mapped = match (parent, part.as_str()) {
            // Enum variants of the residual blocks do not appear in torchvision's names.
            (_, "Basic" | "Bottleneck") => continue,
            (Some("downsample"), "conv") => "0",
            (Some("downsample"), "bn") => "1",
            (Some("projector" | "predictor"), "linear1") => {
                linear = true;
                "0"
            }
            (Some("projector" | "predictor"), "bn") => "1",
            (Some("projector" | "predictor"), "linear2") => {
                linear = true;
                "3"
            }
            (_, "gamma") => "weight",
            (_, "beta") => "bias",
            // The backbone sits at the top level of a torchvision state dict.
            (None | Some("encoder"), "encoder" | "backbone") => continue,
            (_, other) => other,
        };
        parts.push(mapped);
    }
    let is_weight = parts.last() == Some(&"weight");
    (parts.join("."), linear && is_weight)
}

/// Every float tensor of `module` under its PyTorch name: shape and values.
#[derive(Default)]
struct Collect {
    path: Vec<String>,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let (name, transpose) = torch_name(&self.path);
        let mut value = param.val();
        if transpose && D == 2 {
            value = value.swap_dims(0, 1);
        }
        let shape = value.dims().to_vec();
        self.tensors
            .insert(name, (shape, value.into_data().iter::<f32>().collect()));
    }
}

/// `module`'s tensors as a safetensors file (float32) with `metadata`, written atomically.
pub fn export(
    module: &impl Module,
    metadata: HashMap<String, String>,
    out: &Path,
) -> Result<usize> {
    crate::model::sync_running_stats(module);
    let mut collect = Collect::default();
    module.visit(&mut collect);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = collect
        .tensors
        .into_iter()
        .map(|(name, (shape, values))| {
            (
                name,
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            Ok((
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), data)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let file = safetensors::serialize(views, Some(metadata))?;
    crate::io::write_atomic(out, &file)?;
    Ok(bytes.len())
}

/// Replaces `module`'s tensors by those of the same PyTorch name in a safetensors file.
struct Load<'a> {
    path: Vec<String>,
    file: &'a SafeTensors<'a>,
    loaded: usize,
    error: Option<anyhow::Error>,
}

impl ModuleMapper for Load<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (name, transpose) = torch_name(&self.path);
        let Ok(view) = self.file.tensor(&name) else {
            return param;
        };
        let values: Result<Vec<f32>> = match view.dtype() {
            Dtype::F32 => Ok(view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            Dtype::I64 if name.ends_with("num_batches_tracked") => return param,
            other => Err(anyhow!(
                "tensor `{name}` is {other:?}; only float32 is read"
            )),
        };
        let shape: Vec<usize> = view.shape().to_vec();
        let result = values.and_then(|values| {
            let expected: Vec<usize> = {
                let dims = param.val().dims().to_vec();
                if transpose && D == 2 {
                    vec![dims[1], dims[0]]
                } else {
                    dims
                }
            };
            if shape != expected {
                bail!("tensor `{name}` has shape {shape:?}, the model expects {expected:?}");
            }
            Ok(values)
        });
        match result {
            Ok(values) => {
                self.loaded += 1;
                param.map(|old| {
                    let device = old.device();
                    let loaded = Tensor::<D>::from_data(TensorData::new(values, shape), &device);
                    let loaded = if transpose && D == 2 {
                        loaded.swap_dims(0, 1)
                    } else {
                        loaded
                    };
                    loaded.set_require_grad(old.is_require_grad())
                })
            }
            Err(e) => {
                self.error.get_or_insert(e);
                param
            }
        }
    }
}

/// Loads the tensors of `path` whose PyTorch names match `module`'s (others are ignored, as
/// `strict=False`). Fails on a shape or dtype mismatch, or when nothing matched.
pub fn import<M: Module>(module: M, path: &Path) -> Result<M> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let mut load = Load {
        path: Vec::new(),
        file: &file,
        loaded: 0,
        error: None,
    };
    let module = module.map(&mut load);
    if let Some(e) = load.error {
        return Err(e.context(format!("cannot load {}", path.display())));
    }
    if load.loaded == 0 {
        bail!(
            "no tensor of {} matches this model's parameter names",
            path.display()
        );
    }
    tracing::info!("loaded {} tensors from {}", load.loaded, path.display());
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(module: &impl Module) -> BTreeMap<String, Vec<usize>> {
        let mut c = Collect::default();
        module.visit(&mut c);
        c.tensors
            .into_iter()
            .map(|(k, (shape, _))| (k, shape))
            .collect()
    }

    #[test]
    fn backbone_names_and_shapes_match_torchvision_resnet18() {
        use crate::model::resnet::{Architecture, BackboneConfig, Stem};
        let config = BackboneConfig {
            architecture: Architecture::Resnet18,
            stem: Stem::Imagenet,
            width: 1.0,
        };
        let ours = names(&config.init(&Default::default()));
        // torchvision.models.resnet18().state_dict() without fc.* and num_batches_tracked.
        let fixture: BTreeMap<String, Vec<usize>> =
            include_str!("../tests/fixtures/resnet18_state_dict.txt")
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let (name, shape) = l.split_once(' ').unwrap();
                    (
                        name.to_string(),
                        shape.split(',').map(|d| d.parse().unwrap()).collect(),
                    )
                })
                .collect();
        assert_eq!(ours, fixture);
    }
}

/// Writes a float32 matrix (`rows x cols`) or an int64 vector as a NumPy `.npy` file
/// (format version 1.0: magic, little-endian header dict padded to 64 bytes, raw data).
pub fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_text = match shape {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod npy_tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_describes_the_array() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = npy_bytes("<f4", &[2, 3], &data);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(
            header.contains("'descr': '<f4'")
                && header.contains("'shape': (2, 3)")
                && header.ends_with('\n')
        );
        assert_eq!(&bytes[10 + header_len..], &data[..]);
        assert!(
            String::from_utf8_lossy(&npy_bytes("<i8", &[4], &[0; 32])).contains("'shape': (4,)")
        );
    }

    #[test]
    fn exported_backbone_loads_back_into_another_model_with_identical_features() {
        use crate::model::resnet::{Architecture, BackboneConfig, Stem};
        use burn::tensor::{Device, Distribution};
        let dir = tempfile::tempdir().unwrap();
        let device = Device::default();
        let config = BackboneConfig {
            architecture: Architecture::Resnet18,
            stem: Stem::Cifar,
            width: 0.125,
        };
        let a = config.init(&device);
        let file = dir.path().join("a.safetensors");
        let meta = HashMap::from([("backbone".to_string(), "resnet18".to_string())]);
        assert_eq!(export(&a, meta, &file).unwrap(), 100);
        let b = import(config.init(&device), &file).unwrap();
        let x = Tensor::<4>::random([2, 3, 16, 16], Distribution::Normal(0.0, 1.0), &device);
        let fa: Vec<f32> = a.forward(x.clone()).into_data().iter().collect();
        let fb: Vec<f32> = b.forward(x).into_data().iter().collect();
        assert_eq!(fa, fb);
        // A file for another width is refused with the tensor's name.
        let wide = BackboneConfig {
            width: 0.25,
            ..config
        };
        let err = format!("{:#}", import(wide.init(&device), &file).err().unwrap());
        assert!(
            err.contains("conv1.weight") || err.contains("shape"),
            "{err}"
        );
    }
}
