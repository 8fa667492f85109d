//! The libtorch device of a [`DeviceSpec`] (`cpu`, `cuda`, `cuda:N`, `auto`): the one device
//! parser of every command and config.

use anyhow::Result;
use eqim_common::device::DeviceSpec;
use tch::Device;

/// The libtorch device `spec` names.
pub fn device_of(spec: DeviceSpec) -> Device {
    match spec {
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(n) => Device::Cuda(n),
        DeviceSpec::Auto => Device::cuda_if_available(),
    }
}

/// Parses a device name (`cpu`, `cuda`, `cuda:N`, `auto`).
pub fn parse_device(name: &str) -> Result<Device> {
    Ok(device_of(name.parse::<DeviceSpec>()?))
}
