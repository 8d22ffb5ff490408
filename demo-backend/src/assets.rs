//! The demo page's static files, read from disk at request time (edits show up on
//! reload): `/` is `demo/index.html`, `/demo/<file>` and `/js/<file>` map into the
//! static directory. Paths are checked segment by segment, so nothing outside it is
//! ever served.

use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Larger files are refused: the demo page and the client library are a few hundred KiB.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Deepest path served under `/demo/` or `/js/`: the layout is flat.
pub const MAX_SEGMENTS: usize = 8;

/// Why a path is not served.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// Not a static route at all: the caller tries its other routes.
    #[error("not a static route")]
    NoRoute,
    /// A segment is empty, hidden, encoded or has characters outside the safe set.
    #[error("path not allowed")]
    Refused,
    #[error("not found")]
    NotFound,
    #[error("file larger than {MAX_FILE_BYTES} bytes")]
    TooLarge,
    #[error("cannot read the file: {0}")]
    Io(std::io::Error),
}

/// A file ready to send.
#[derive(Debug)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: Bytes,
}

/// The static directory.
#[derive(Debug, Clone)]
pub struct Assets {
    root: PathBuf,
}

impl Assets {
    pub fn new(root: PathBuf) -> Assets {
        Assets { root }
    }

    /// The file a URL path names, without touching the disk.
    pub fn resolve(&self, url_path: &str) -> Result<PathBuf, AssetError> {
        if url_path == "/" {
            return Ok(self.root.join("demo").join("index.html"));
        }
        let (dir, rest) = if let Some(rest) = url_path.strip_prefix("/demo/") {
            ("demo", rest)
        } else if let Some(rest) = url_path.strip_prefix("/js/") {
            ("js", rest)
        } else {
            return Err(AssetError::NoRoute);
        };
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.len() > MAX_SEGMENTS || !segments.iter().all(|s| safe_segment(s)) {
            return Err(AssetError::Refused);
        }
        let mut path = self.root.join(dir);
        path.extend(segments);
        Ok(path)
    }

    /// Reads the file behind a URL path. A symlink leading out of the static
    /// directory is refused like a `..`.
    pub async fn load(&self, url_path: &str) -> Result<Asset, AssetError> {
        let path = self.resolve(url_path)?;
        let (real, root) = match (
            tokio::fs::canonicalize(&path).await,
            tokio::fs::canonicalize(&self.root).await,
        ) {
            (Ok(real), Ok(root)) => (real, root),
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AssetError::NotFound);
            }
            (Err(e), _) | (_, Err(e)) => return Err(AssetError::Io(e)),
        };
        if !real.starts_with(&root) {
            return Err(AssetError::Refused);
        }
        let meta = tokio::fs::metadata(&real).await.map_err(AssetError::Io)?;
        if !meta.is_file() {
            return Err(AssetError::NotFound);
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(AssetError::TooLarge);
        }
        let body = tokio::fs::read(&real).await.map_err(AssetError::Io)?;
        Ok(Asset {
            content_type: content_type(&real),
            body: Bytes::from(body),
        })
    }
}

/// Letters, digits, `.`, `_`, `-`; not empty and not starting with a dot (so neither
/// `..` nor hidden files). Percent-encoded paths are refused rather than decoded.
fn safe_segment(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The `Content-Type` for a file name; browsers refuse module scripts served with
/// anything but a JavaScript type.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        Some("txt" | "md" | "ts") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_refusals() {
        let a = Assets::new(PathBuf::from("/srv"));
        assert_eq!(
            a.resolve("/").unwrap(),
            PathBuf::from("/srv/demo/index.html")
        );
        assert_eq!(
            a.resolve("/js/switchboard.js").unwrap(),
            PathBuf::from("/srv/js/switchboard.js")
        );
        assert_eq!(
            a.resolve("/demo/img/logo.svg").unwrap(),
            PathBuf::from("/srv/demo/img/logo.svg")
        );
        for bad in [
            "/demo/../secret",
            "/demo/..",
            "/js/.env",
            "/js/",
            "/js//x.js",
            "/js/%2e%2e/x",
            "/demo/a\\b",
        ] {
            assert!(matches!(a.resolve(bad), Err(AssetError::Refused)), "{bad}");
        }
        assert!(matches!(a.resolve("/etc/passwd"), Err(AssetError::NoRoute)));
        assert!(matches!(a.resolve("/demo"), Err(AssetError::NoRoute)));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            content_type(Path::new("a.mjs")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("A.JS")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("s.css")), "text/css; charset=utf-8");
        assert_eq!(content_type(Path::new("i.svg")), "image/svg+xml");
        assert_eq!(content_type(Path::new("x")), "application/octet-stream");
    }
}
