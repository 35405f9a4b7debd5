//! Backend selection: which backends are compiled in is a cargo feature, which one runs is
//! `--device`.

use anyhow::{Result, bail};
use burn::tensor::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// burn-flex, pure-Rust CPU (feature `flex`, the default).
    Flex,
    /// WebGPU through wgpu: Vulkan, Metal or DX12, whichever the machine has (feature `wgpu`).
    Wgpu,
    /// wgpu pinned to Vulkan (feature `vulkan`).
    Vulkan,
    /// NVIDIA CUDA (feature `cuda`).
    Cuda,
}

impl Backend {
    /// The first compiled-in backend, GPU ones first.
    pub fn default_compiled() -> Backend {
        if cfg!(feature = "cuda") {
            Backend::Cuda
        } else if cfg!(feature = "vulkan") {
            Backend::Vulkan
        } else if cfg!(feature = "wgpu") {
            Backend::Wgpu
        } else {
            Backend::Flex
        }
    }

    /// The device to train on (with autodiff).
    // A build without any backend (the fuzz targets') can only refuse.
    #[cfg_attr(
        not(any(
            feature = "flex",
            feature = "wgpu",
            feature = "vulkan",
            feature = "cuda"
        )),
        allow(unreachable_code, unused_variables)
    )]
    pub fn training_device(self) -> Result<Device> {
        let device: Device = match self {
            #[cfg(feature = "flex")]
            Backend::Flex => Device::flex(),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Device::wgpu(Default::default()),
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => Device::vulkan(Default::default()),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Device::cuda(0usize),
            #[allow(unreachable_patterns)]
            other => {
                bail!(
                    "--device {name} is not compiled into this binary: rebuild with `--features {name}`",
                    name = other.name()
                )
            }
        };
        if self != Backend::Flex {
            self.probe(&device)?;
        }
        Ok(device.autodiff())
    }

    fn name(self) -> String {
        format!("{self:?}").to_lowercase()
    }

    /// Starts a GPU backend with one small tensor read back. A machine without the driver or
    /// adapter makes the backend panic on its own thread (wgpu: "no adapter found"); that
    /// becomes an error naming the flag instead of a crash later in the run.
    fn probe(self, device: &Device) -> Result<()> {
        let device = device.clone();
        let started = std::panic::catch_unwind(move || {
            burn::tensor::Tensor::<1>::zeros([1], &device).into_data()
        });
        if started.is_err() {
            bail!(
                "--device {name}: the {name} backend could not start on this machine (its \
                 message is above); check the GPU driver, or use another --device",
                name = self.name()
            );
        }
        Ok(())
    }
}
