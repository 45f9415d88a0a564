//! One validation: `--check-config` refuses exactly the files startup refuses, with the same
//! message.

use std::{path::Path, process::Command};

use llm_gateway::{
    config::{Config, Overrides},
    server,
};

/// Runs `llm-gateway --config FILE --check-config` in `dir`: exit code and stderr.
fn check_config(dir: &Path, file: &Path) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-gateway"));
    for (name, _) in std::env::vars() {
        if name.starts_with("LLM_GATEWAY_") || name.ends_with("_API_KEY") {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .current_dir(dir)
        .arg("--config")
        .arg(file)
        .arg("--check-config")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts the gateway on `file` as the binary would load it: the error it stops with.
async fn startup_error(file: &Path) -> Option<String> {
    let config = Config::load(Some(file), &Overrides::default(), &|_| None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // A config startup accepts serves until stopped: stop it at once.
    server::run(config, listener, async {})
        .await
        .err()
        .map(|e| e.to_string())
}

#[tokio::test]
async fn check_config_refuses_what_startup_refuses_with_the_same_message() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("data/gw.db");
    std::fs::create_dir_all(store.parent().unwrap()).unwrap();
    // A directory where the stored admin token should be: unreadable as a token.
    std::fs::create_dir_all(dir.path().join("data/admin-token")).unwrap();
    let store_section = format!(
        "[store]\npath = \"{}\"\n[metrics]\nlisten = \"off\"\n[http]\nlisten = \"off\"\n",
        store.display()
    );
    let cases = [
        (
            "a policy over an unknown provider",
            "[admin]\ntoken = \"0123456789abcdef0123\"\n[policies.p]\ntargets = [{ provider = \"nope\", model = \"x\" }]\n".to_owned(),
        ),
        (
            "missing certificate files",
            format!(
                "[admin]\ntoken = \"0123456789abcdef0123\"\n[tls]\ncert = \"{0}/missing.pem\"\nkey = \"{0}/missing.key\"\n",
                dir.path().display()
            ),
        ),
        ("an unreadable stored admin token", String::new()),
    ];
    for (what, body) in cases {
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, format!("{store_section}{body}")).unwrap();
        let refused = startup_error(&file)
            .await
            .unwrap_or_else(|| panic!("startup accepted {what}"));
        let (code, stderr) = check_config(dir.path(), &file);
        assert_eq!(code, Some(2), "{what}: {stderr}");
        assert_eq!(
            stderr.trim_end(),
            format!("llm-gateway: {refused}"),
            "{what}"
        );
    }

    // A file startup accepts passes (with nothing on fixed ports: metrics and the HTTP front
    // are off).
    std::fs::remove_dir(dir.path().join("data/admin-token")).unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!("{store_section}[admin]\ntoken = \"0123456789abcdef0123\"\n"),
    )
    .unwrap();
    assert_eq!(startup_error(&file).await, None);
    let (code, stderr) = check_config(dir.path(), &file);
    assert_eq!(code, Some(0), "{stderr}");
}
