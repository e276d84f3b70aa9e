//! Python virtual environments under `$VEIL_HOME` for the benchmarks that run another engine
//! (llama.cpp, EZKL) side by side with Veil: made once with `python3 -m venv` and `pip`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::progress;

/// What a benchmark needs installed.
pub struct VenvSpec<'a> {
    /// Directory name under `$VEIL_HOME`.
    pub name: &'a str,
    /// Packages for `pip install`.
    pub packages: &'a [&'a str],
    /// Modules that must import once installed (`import a, b`).
    pub imports: &'a str,
    /// Environment for pip (build flags).
    pub env: Vec<(&'a str, String)>,
    /// What the spinner says while installing (how long it takes).
    pub note: &'a str,
}

/// The Python of the venv `spec` describes, installing it the first time.
pub fn venv_python(home: &Path, spec: &VenvSpec) -> Result<PathBuf> {
    let venv = home.join(spec.name);
    let python = venv.join("bin").join("python");
    let imports = |python: &Path| {
        Command::new(python)
            .args(["-c", &format!("import {}", spec.imports)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if imports(&python) {
        return Ok(python);
    }
    let log = home.join(format!("{}-install.log", spec.name));
    let spinner = progress::spinner(format!(
        "installing {} into {} ({}; log in {})",
        spec.packages.join(" "),
        venv.display(),
        spec.note,
        log.display()
    ));
    let installed = install(&venv, spec, &log);
    spinner.finish_and_clear();
    installed?;
    ensure!(
        imports(&python),
        "{} installed but does not import; see {}",
        spec.packages.join(" "),
        log.display()
    );
    Ok(python)
}

fn install(venv: &Path, spec: &VenvSpec, log: &Path) -> Result<()> {
    std::fs::create_dir_all(venv.parent().unwrap_or(venv))
        .with_context(|| format!("cannot create {}", venv.display()))?;
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot write {}", log.display()))?;
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .context("cannot run python3 -m venv: is Python 3 installed?")?;
    ensure!(
        status.success(),
        "python3 -m venv {} failed",
        venv.display()
    );
    let status = Command::new(venv.join("bin").join("pip"))
        .arg("install")
        .args(spec.packages)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("cannot run the venv's pip")?;
    if !status.success() {
        bail!(
            "pip install {} failed; see {}",
            spec.packages.join(" "),
            log.display()
        );
    }
    Ok(())
}
