//! The DMA engine and pinning on real KVM: transfers racing unplug complete or
//! stop cleanly with contents matching a model, pins are released, the pin
//! limit is enforced and reported, and `--vfio` is refused where there is none.

use std::path::PathBuf;
use std::process::Command;

use vmm_tests::kvm_or_skip;

fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(name)
}

fn vmm_json(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(args)
        .output()
        .expect("vmm runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), json, stderr)
}

#[test]
fn test_dma_racing_unplug_completes_or_stops_cleanly_and_unpins() {
    if !kvm_or_skip("DMA racing unplug") {
        return;
    }
    let path = scenario("dma-vs-unplug.toml");
    let (code, r, err) = vmm_json(&["run", "--json", "--scenario", path.to_str().unwrap()]);
    // The scenario itself checks the model (the destination never receives
    // zeros from the unplugged source) and that pinned pages return to 0.
    assert_eq!(code, Some(0), "{err}");
    let dma = &r["dma"];
    let n = |k: &str| dma[k].as_u64().unwrap();
    assert_eq!(n("submitted"), 120);
    assert_eq!(
        n("done") + n("faults") + n("revoked") + n("no_pin") + n("invalid"),
        120
    );
    // Each unplug waits until a transfer has finished (`completed = 1`),
    // so this holds however slow the host; the 59 transfers after it
    // meet the unplug.
    assert!(
        n("done") >= 1,
        "some transfers completed before the unplugs: {dma}"
    );
    assert!(
        n("faults") + n("revoked") >= 1,
        "some transfers met an unplug: {dma}"
    );
    let pins = &r["pins"]["pinned_pages"];
    assert_eq!(pins["charged"], 0, "{pins}");
    assert!(
        pins["peak"].as_u64().unwrap() >= 1024,
        "a transfer pins 1024 pages: {pins}"
    );
    assert_eq!(r["pins"]["dma_mappings"]["charged"], 0);
}

#[test]
fn test_pin_limit_refuses_dma_and_reports_failures() {
    if !kvm_or_skip("pin limit") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-pinlimit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("limit.toml");
    std::fs::write(
        &path,
        r#"
        [[step]]
        do = "plug"
        gpa = "0x1_0000_0000"
        size = "4M"
        [[step]]
        do = "dma-copy"
        gpa = "0x1_0000_0000"
        to = "0x1_0020_0000"
        size = "2M"
        expect = "dma-no-pin"
        [[step]]
        do = "dma-checksum"
        gpa = "0x1_0000_0000"
        size = "256K"
        value = 0
        [[step]]
        do = "pin"
        name = "big"
        gpa = "0x1_0000_0000"
        size = "2M"
        expect = "pin-limit"
        "#,
    )
    .unwrap();
    let (code, r, err) = vmm_json(&[
        "run",
        "--json",
        "--pin-limit",
        "1M",
        "--scenario",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let pins = &r["pins"]["pinned_pages"];
    assert_eq!(pins["limit"], 256);
    assert_eq!(pins["charged"], 0);
    assert!(pins["charge_failures"].as_u64().unwrap() >= 2, "{pins}");
    assert!(
        pins["peak"].as_u64().unwrap() <= 256,
        "never above the limit: {pins}"
    );
    assert_eq!(r["dma"]["no_pin"], 1);
    assert_eq!(r["dma"]["done"], 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn test_vfio_without_container_is_refused_before_vm() {
    if std::path::Path::new("/dev/vfio/vfio").exists() {
        eprintln!("SKIP: this host has a VFIO container; the refusal path does not apply");
        return;
    }
    let (code, _, err) = vmm_json(&["run", "--vfio"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--vfio") && err.contains("/dev/vfio/vfio is missing"),
        "{err}"
    );
}
