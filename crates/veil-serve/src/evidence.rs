//! Evidence against a lying node, written as a file by the verified backends.

use std::path::PathBuf;

use crate::error::{Result, ServeError};

/// Writes a record as `<job digest>.json` (through a temporary file, so none is half
/// written); returns the path.
pub fn write_evidence<J: veil_verify::Judged>(
    dir: &std::path::Path,
    record: &veil_verify::Evidence<J>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(ServeError::io(format!("cannot create {}", dir.display())))?;
    let path = dir.join(format!(
        "{}.json",
        veil_verify::job_digest(&record.job.body)?
    ));
    let tmp = path.with_extension("json.partial");
    let bytes = record.to_bytes()?;
    std::fs::File::create(&tmp)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(ServeError::io(format!("cannot write {}", path.display())))?;
    Ok(path)
}
