//! VFIO passthrough detection for `--vfio`.
//!
//! With a VFIO container (`/dev/vfio/vfio`) and a device's group
//! (`/dev/vfio/<N>`), device DMA would be mapped with `VFIO_IOMMU_MAP_DMA`
//! over pinned guest memory. This host has neither (no IOMMU group is exposed
//! to the guest we run in), so `--vfio` must fail before any VM is created,
//! saying what is missing.

use std::path::Path;

/// Why VFIO cannot be used here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VfioError {
    /// No container device node.
    #[error("--vfio: no VFIO container on this host ({0} is missing: load the vfio module and bind a device to vfio-pci)")]
    NoContainer(String),
    /// A container but no group a device was bound to.
    #[error("--vfio: {0} exists but no VFIO group does (bind a device to vfio-pci to get /dev/vfio/<group>)")]
    NoGroup(String),
    /// Container and group exist, but this build has no VFIO mapping path.
    #[error("--vfio: found VFIO group {0}, but mapping guest memory with VFIO_IOMMU_MAP_DMA is not supported by this build")]
    Unsupported(String),
}

/// Checks for a VFIO container and group under `root` (normally `/dev/vfio`).
pub fn probe(root: &Path) -> Result<(), VfioError> {
    let container = root.join("vfio");
    if !container.exists() {
        return Err(VfioError::NoContainer(container.display().to_string()));
    }
    let group = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.chars().all(|c| c.is_ascii_digit()));
    match group {
        None => Err(VfioError::NoGroup(container.display().to_string())),
        Some(g) => Err(VfioError::Unsupported(root.join(g).display().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_probe_missing_container_names_the_node() {
        let err = probe(Path::new("/nonexistent/vfio-root")).unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent/vfio-root/vfio is missing"),
            "{err}"
        );
    }

    #[test]
    fn test_probe_container_without_group_says_bind_a_device() {
        let dir = std::env::temp_dir().join(format!("vmm-vfio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vfio"), b"").unwrap();
        assert!(matches!(probe(&dir), Err(VfioError::NoGroup(_))));
        std::fs::write(dir.join("12"), b"").unwrap();
        assert!(matches!(probe(&dir), Err(VfioError::Unsupported(_))));
        let _ = std::fs::remove_dir_all(dir);
    }
}
