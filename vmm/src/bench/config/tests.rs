//! The flags' parsing and validation, and the configuration's parts.

use super::*;

#[test]
fn test_backing_parse_every_name_roundtrips() {
    for s in [
        "anon",
        "shared",
        "memfd",
        "thp",
        "hugetlb",
        "prefault",
        "populate",
        "file",
        "file=/tmp/x",
        "uffd-zero",
        "uffd-copy",
        "uffd-minor",
        "uffd-wp",
    ] {
        assert_eq!(s.parse::<Backing>().unwrap().to_string(), s);
    }
    let e = "bogus".parse::<Backing>().unwrap_err().to_string();
    assert!(e.contains("uffd-copy") && e.contains("uffd-wp"), "{e}");
}

#[test]
fn test_uffd_flags_are_checked() {
    let cfg = args(&["--backing", "uffd-minor", "--uffd-per-vcpu", "--vcpus", "3"])
        .to_config()
        .unwrap();
    assert_eq!(cfg.uffd_parts().len(), 3);
    assert_eq!(cfg.uffd_parts()[1], cfg.part(1));
    let e = args(&[
        "--backing",
        "uffd-wp",
        "--uffd-per-vcpu",
        "--share",
        "shared",
    ])
    .to_config()
    .unwrap_err();
    assert_eq!(e, ConfigError::UffdPerVcpuShared);
    let e = args(&["--handler-delay", "10us"]).to_config().unwrap_err();
    assert_eq!(e, ConfigError::UffdFlagWithoutUffd("--handler-delay"));
    let cfg = args(&["--backing", "uffd-zero", "--handler-delay", "10us"])
        .to_config()
        .unwrap();
    assert_eq!(cfg.handler_delay, Duration::from_micros(10));
    assert_eq!(parse_handler_delay("0"), Ok(Duration::ZERO));
    for bad in ["2s", "10", "-1us", "fast"] {
        let e = parse_handler_delay(bad).unwrap_err();
        assert!(e.contains("--handler-delay"), "{bad}: {e}");
    }
}

#[test]
fn test_scaling_counts_double_up_to_the_top() {
    let mut cfg = FaultsConfig::small(64 << 20, Backing::UffdMinor);
    assert_eq!(cfg.scaling_counts(2), vec![1, 2]);
    assert_eq!(cfg.scaling_counts(1), vec![1]);
    cfg.vcpus = 6;
    assert_eq!(cfg.scaling_counts(2), vec![1, 2, 4, 6]);
}

#[derive(Debug, clap::Parser)]
struct Cli {
    #[command(flatten)]
    faults: FaultsArgs,
}

fn args(flags: &[&str]) -> FaultsArgs {
    use clap::Parser;
    let argv = std::iter::once("bench").chain(flags.iter().copied());
    Cli::try_parse_from(argv).unwrap().faults
}

#[test]
fn test_args_fill_every_config_field() {
    let cfg = args(&[]).to_config().unwrap();
    assert_eq!(cfg.backings, vec![Backing::ANON]);
    assert!(cfg.baselines && cfg.progress);
    assert_eq!((cfg.size, cfg.rounds, cfg.seed), (64 << 20, 1, 0x5EED));
    let cfg = args(&[
        "--size",
        "4M",
        "--compare",
        "thp,uffd-copy",
        "--no-baselines",
        "-q",
        "--guest-page",
        "4k",
        "--access",
        "read",
        "--uffd-cpu",
        "other",
        "--vcpus",
        "2",
    ])
    .to_config()
    .unwrap();
    assert_eq!(cfg.backings, vec![Backing::THP, Backing::UffdCopy]);
    assert!(!cfg.baselines && !cfg.progress);
    assert_eq!((cfg.size, cfg.vcpus), (4 << 20, 2));
    assert_eq!(cfg.guest_page, GuestPage::Size4K);
    assert_eq!(
        (
            cfg.access.to_string(),
            cfg.uffd_cpu.to_string(),
            cfg.share.to_string()
        ),
        ("read".into(), "other".into(), "disjoint".into())
    );
}

#[test]
fn test_pattern_parse_and_access_counts() {
    assert_eq!("seq".parse::<Pattern>(), Ok(Pattern::Sequential));
    assert_eq!(Pattern::Sequential.accesses(64 << 10), 16);
    assert_eq!(Pattern::Stride(8192).accesses(64 << 10), 8);
    assert_eq!(Pattern::Stride(3000).accesses(9000), 3);
    assert!("zigzag".parse::<Pattern>().is_err());
}

#[test]
fn test_config_parts_are_disjoint_and_cover_range() {
    let mut c = FaultsConfig::small(10 * PAGE_SIZE, Backing::ANON);
    c.vcpus = 3;
    let parts: Vec<_> = (0..3).map(|i| c.part(i)).collect();
    assert_eq!(parts, vec![(0, 12288), (12288, 12288), (24576, 16384)]);
    c.share = Share::Shared;
    assert_eq!(c.part(2), (0, 10 * PAGE_SIZE));
}

#[test]
fn test_config_thp_size_must_be_2m_multiple() {
    let c = FaultsConfig::small(3 << 20, Backing::THP);
    let e = c.validate().unwrap_err();
    assert!(
        matches!(e, ConfigError::Size { align, .. } if align == HUGE_2M),
        "{e}"
    );
}

#[test]
fn test_config_too_many_accesses_is_rejected() {
    let mut c = FaultsConfig::small(64 << 20, Backing::ANON);
    c.pattern = Pattern::Stride(8);
    assert!(matches!(
        c.validate(),
        Err(ConfigError::TooManyAccesses { .. })
    ));
}

#[test]
fn test_guest_page_parse() {
    assert_eq!("4k".parse::<GuestPage>(), Ok(GuestPage::Size4K));
    assert_eq!("1G".parse::<GuestPage>(), Ok(GuestPage::Size1G));
    assert!("8K".parse::<GuestPage>().is_err());
    assert_eq!(fmt_size(64 << 20), "64M");
}

#[test]
fn test_scaling_refuses_churn_record_and_replay() {
    let mut c = FaultsConfig::small(4 << 20, Backing::ANON);
    c.scaling = true;
    assert!(c.validate().is_ok());
    let mut churn = c.clone();
    churn.churn.ops = vec![super::super::churn::ops::ChurnOp::Dontneed];
    let mut record = c.clone();
    record.workset.record = Some("r".into());
    let mut replay = c.clone();
    replay.workset.replay = Some("r".into());
    for (cfg, flag) in [
        (churn, "--churn"),
        (record, "--record"),
        (replay, "--replay"),
    ] {
        match cfg.validate() {
            Err(ConfigError::Workset(m)) => {
                assert!(m.contains("--scaling") && m.contains(flag), "{m}")
            }
            other => panic!("{flag} with --scaling: {other:?}"),
        }
    }
}

#[test]
fn test_churn_dontneed_is_refused_with_uffd_backings_only() {
    use super::super::churn::ops::ChurnOp;
    let mut c = FaultsConfig::small(4 << 20, Backing::UffdZero);
    c.churn.ops = vec![ChurnOp::Plug, ChurnOp::Protect];
    assert!(c.validate().is_ok());
    c.churn.ops.push(ChurnOp::Dontneed);
    for b in [
        Backing::UffdZero,
        Backing::UffdCopy,
        Backing::UffdMinor,
        Backing::UffdWp,
    ] {
        c.backings = vec![Backing::ANON, b.clone()];
        match c.validate() {
            Err(ConfigError::Workset(m)) => {
                assert!(m.contains("dontneed") && m.contains(&b.to_string()), "{m}")
            }
            other => panic!("dontneed with {b}: {other:?}"),
        }
    }
    c.backings = vec![Backing::ANON];
    assert!(c.validate().is_ok());
}

#[test]
fn test_prefetch_flags_must_fit_the_backing() {
    let mut o = WorksetOptions {
        replay: Some("x".into()),
        prefetch: Prefetch::Copy,
        ..WorksetOptions::default()
    };
    assert!(validate_workset(&o, &[Backing::UffdCopy]).is_ok());
    assert!(validate_workset(&o, &[Backing::ANON])
        .unwrap_err()
        .contains("uffd-copy"));
    o.prefetch = Prefetch::Populate;
    assert!(validate_workset(&o, &[Backing::ANON]).is_ok());
    assert!(validate_workset(&o, &[Backing::UffdZero]).is_err());
    assert!(validate_workset(&o, &[Backing::Populate]).is_err());
    let r = WorksetOptions {
        record: Some("y".into()),
        ..WorksetOptions::default()
    };
    assert!(validate_workset(&r, &[Backing::ANON, Backing::THP]).is_err());
}
