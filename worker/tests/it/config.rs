//! The binary's configuration handling: `--check-config`, unknown keys refused by
//! name, exit code 64 on configuration errors.

use std::process::{Command, Output};

fn worker(envs: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_worker"));
    c.env_clear();
    if let Ok(path) = std::env::var("PATH") {
        c.env("PATH", path);
    }
    c.envs(envs.iter().copied()).args(args).output().unwrap()
}

const BASE: (&str, &str) = ("SB_LLM_BASE_URL", "http://127.0.0.1:8000/v1");

#[test]
fn check_config_accepts_a_valid_setup_and_hides_secrets() {
    let out = worker(
        &[
            BASE,
            ("SB_LLM_API_KEY", "sk-very-secret"),
            ("SB_MAX_IN_FLIGHT", "8"),
        ],
        &["--check-config"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.starts_with("config ok"), "{stdout}");
    assert!(stdout.contains("\"max_in_flight\":8"), "{stdout}");
    assert!(!stdout.contains("sk-very-secret"), "{stdout}");
}

#[test]
fn bad_settings_are_named_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    std::fs::write(&file, "max_in_flight = 4\nbogus_key = 1\n").unwrap();
    let file = file.to_str().unwrap();
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (vec![BASE, ("SB_LLM_BOGUS", "1")], vec![], "SB_LLM_BOGUS"),
        (vec![BASE], vec!["--config", file], "bogus_key"),
        (
            vec![BASE, ("SB_MAX_IN_FLIGHT", "0")],
            vec![],
            "SB_MAX_IN_FLIGHT",
        ),
        (
            vec![BASE, ("SB_LLM_PROTOCOL", "grpc")],
            vec![],
            "SB_LLM_PROTOCOL",
        ),
        (vec![], vec![], "SB_LLM_BASE_URL"),
        (
            vec![("SB_LLM_BASE_URL", "localhost:8000")],
            vec![],
            "SB_LLM_BASE_URL",
        ),
    ];
    for (envs, mut args, key) in cases {
        args.push("--check-config");
        let out = worker(&envs, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {stderr}");
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
}
