//! CA certificates from PEM files; a leaf, shared by the peer transport,
//! the client and the settings check, so none of them reaches into another.

use std::path::Path;

/// Why a CA file gave no certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("read CA file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("CA file {path}: {source}")]
    Parse {
        path: String,
        source: reqwest::Error,
    },
    #[error("CA file {path}: no PEM certificate found")]
    Empty { path: String },
}

/// CA certificates from a PEM file, refusing a file with none.
pub fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, CaError> {
    let shown = || path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| CaError::Read {
        path: shown(),
        source,
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| CaError::Parse {
        path: shown(),
        source,
    })?;
    if certs.is_empty() {
        return Err(CaError::Empty { path: shown() });
    }
    Ok(certs)
}
