//! Chat attachments (`files` on a chat request: name, type, base64 data), checked
//! again here because the worker does not trust the gateway: limits on count and
//! total decoded size; text types are inlined into the prompt under their file name;
//! PDFs have their text extracted in a bounded child process ([`crate::pdf`]);
//! anything else is refused naming the file. The text of all files together is cut
//! at `FileLimits::max_text_chars`, and the prompt says where: a small PDF can hold
//! megabytes of text, and the LLM request must stay a sane size.

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use shared::protocol::FileAttachment;

use crate::config::FileLimits;
use crate::pdf::{PdfError, PdfReader};

/// Put in the prompt where attachment text was cut, so the LLM (and the user
/// reading its answer) knows it saw only part of the file.
pub const TRUNCATED_NOTE: &str =
    "[... the rest of this file was cut: too much attached text for one message]";
/// File names are shown to the LLM and in errors: this many characters at most.
pub const MAX_NAME_CHARS: usize = 200;

/// Base64 as browsers and most clients produce it; padding optional.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why attachments were refused; always the user's `BAD_REQUEST`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachmentError {
    #[error("too many files: {count} (at most {max})")]
    TooMany { count: usize, max: usize },
    #[error("files too large: more than {max} bytes together")]
    TooLarge { max: usize },
    #[error("file {name:?}: data is not valid base64")]
    BadEncoding { name: String },
    #[error("file {name:?}: type {content_type:?} is not supported (text or PDF only)")]
    Unsupported { name: String, content_type: String },
    #[error("file {name:?}: not valid UTF-8 text")]
    NotText { name: String },
    #[error("file {name:?}: {reason}")]
    Pdf { name: String, reason: PdfError },
}

impl AttachmentError {
    /// Worker-side trouble (busy, extractor missing): the same request may work later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AttachmentError::Pdf { reason, .. } if reason.is_retryable())
    }
}

/// An attachment turned into text for the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub name: String,
    pub content_type: String,
    pub text: String,
    /// The text was cut at the per-request cap.
    pub truncated: bool,
}

/// What a content type is to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Pdf,
    Unsupported,
}

/// `text/*`, JSON, XML, YAML, TOML, CSV, scripts and sources count as text.
pub fn kind(content_type: &str) -> Kind {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if ct == "application/pdf" || ct == "application/x-pdf" {
        return Kind::Pdf;
    }
    if ct.starts_with("text/") || ct.ends_with("+json") || ct.ends_with("+xml") {
        return Kind::Text;
    }
    const TEXT_APPLICATION: &[&str] = &[
        "application/json",
        "application/ld+json",
        "application/x-ndjson",
        "application/ndjson",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/x-toml",
        "application/csv",
        "application/sql",
        "application/graphql",
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "application/typescript",
        "application/x-typescript",
        "application/x-sh",
        "application/x-shellscript",
        "application/x-python",
        "application/x-python-code",
        "application/x-httpd-php",
        "application/x-tex",
        "application/x-latex",
        "application/rtf",
    ];
    if TEXT_APPLICATION.contains(&ct.as_str()) {
        Kind::Text
    } else {
        Kind::Unsupported
    }
}

/// A file name safe to show: control characters replaced, length bounded.
pub fn display_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_NAME_CHARS)
        .collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() {
        "unnamed".to_owned()
    } else {
        cleaned.to_owned()
    }
}

/// Checks limits, decodes and extracts every file, in order; the text of all of
/// them together is at most `limits.max_text_chars` characters.
pub async fn prepare(
    files: &[FileAttachment],
    limits: FileLimits,
    pdf: &PdfReader,
) -> Result<Vec<Extracted>, AttachmentError> {
    if files.len() > limits.max_files {
        return Err(AttachmentError::TooMany {
            count: files.len(),
            max: limits.max_files,
        });
    }
    // Before decoding anything: base64 is 4 characters per 3 bytes.
    let estimate: usize = files.iter().map(|f| f.data.len() / 4 * 3).sum();
    if estimate > limits.max_total_bytes + 3 * files.len() {
        return Err(AttachmentError::TooLarge {
            max: limits.max_total_bytes,
        });
    }
    let mut decoded = Vec::with_capacity(files.len());
    let mut total = 0usize;
    for f in files {
        let name = display_name(&f.name);
        let kind = kind(&f.content_type);
        if kind == Kind::Unsupported {
            return Err(AttachmentError::Unsupported {
                name,
                content_type: f.content_type.chars().take(100).collect(),
            });
        }
        let bytes =
            decode(&f.data).ok_or_else(|| AttachmentError::BadEncoding { name: name.clone() })?;
        total += bytes.len();
        if total > limits.max_total_bytes {
            return Err(AttachmentError::TooLarge {
                max: limits.max_total_bytes,
            });
        }
        decoded.push((name, f.content_type.clone(), kind, bytes));
    }
    let mut out = Vec::with_capacity(decoded.len());
    let mut chars_left = limits.max_text_chars;
    for (name, content_type, kind, bytes) in decoded {
        let (text, truncated) = match kind {
            Kind::Text => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| AttachmentError::NotText { name: name.clone() })?;
                cut(text, chars_left)
            }
            // Checked even with no room left: a broken file is still refused by name.
            Kind::Pdf if chars_left == 0 && bytes.starts_with(b"%PDF-") => (String::new(), true),
            Kind::Pdf => {
                let e = pdf.extract(&bytes, chars_left).await.map_err(|reason| {
                    AttachmentError::Pdf {
                        name: name.clone(),
                        reason,
                    }
                })?;
                (e.text, e.truncated)
            }
            Kind::Unsupported => unreachable!("refused above"),
        };
        chars_left -= text.chars().count().min(chars_left);
        out.push(Extracted {
            name,
            content_type,
            text,
            truncated,
        });
    }
    Ok(out)
}

/// `text` cut to `max_chars` characters, and whether it was.
fn cut(mut text: String, max_chars: usize) -> (String, bool) {
    match text.char_indices().nth(max_chars) {
        Some((at, _)) => {
            text.truncate(at);
            (text, true)
        }
        None => (text, false),
    }
}

fn decode(data: &str) -> Option<Vec<u8>> {
    let data = data.strip_prefix("data:").map_or(data, |rest| {
        // A data URL: `data:<type>;base64,<payload>`.
        rest.split_once(',').map_or(rest, |(_, payload)| payload)
    });
    if data.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        BASE64.decode(compact).ok()
    } else {
        BASE64
            .decode(data)
            .or_else(|_| general_purpose::URL_SAFE_NO_PAD.decode(data.trim_end_matches('=')))
            .ok()
    }
}

/// The user message with the files' text appended, each under its name.
pub fn inline(message: &str, files: &[Extracted]) -> String {
    if files.is_empty() {
        return message.to_owned();
    }
    let mut out = String::from(message);
    for f in files {
        out.push_str("\n\n--- attached file: ");
        out.push_str(&f.name);
        out.push_str(" (");
        out.push_str(&f.content_type);
        out.push_str(") ---\n");
        out.push_str(&f.text);
        if !f.text.is_empty() && !f.text.ends_with('\n') {
            out.push('\n');
        }
        if f.truncated {
            out.push_str(TRUNCATED_NOTE);
            out.push('\n');
        }
        out.push_str("--- end of ");
        out.push_str(&f.name);
        out.push_str(" ---");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FileLimits = FileLimits {
        max_files: 2,
        max_total_bytes: 100,
        max_text_chars: 1000,
    };

    /// No extractor program: these tests never get as far as a real PDF.
    fn reader() -> PdfReader {
        PdfReader::new(None)
    }

    fn file(name: &str, ct: &str, bytes: &[u8]) -> FileAttachment {
        FileAttachment {
            name: name.into(),
            content_type: ct.into(),
            data: general_purpose::STANDARD.encode(bytes),
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(kind("text/plain; charset=utf-8"), Kind::Text);
        assert_eq!(kind("Application/JSON"), Kind::Text);
        assert_eq!(kind("application/vnd.api+json"), Kind::Text);
        assert_eq!(kind("application/pdf"), Kind::Pdf);
        assert_eq!(kind("image/png"), Kind::Unsupported);
        assert_eq!(kind("application/octet-stream"), Kind::Unsupported);
        assert_eq!(kind(""), Kind::Unsupported);
    }

    #[tokio::test]
    async fn text_is_decoded_and_inlined() {
        let files = prepare(
            &[file("notes.txt", "text/plain", b"hello\n")],
            LIMITS,
            &reader(),
        )
        .await
        .unwrap();
        let m = inline("question", &files);
        assert!(
            m.starts_with("question\n\n--- attached file: notes.txt (text/plain) ---\nhello\n")
        );
        assert!(m.ends_with("--- end of notes.txt ---"));
    }

    #[tokio::test]
    async fn limits_and_refusals_name_the_file() {
        let e = prepare(
            &[
                file("a", "text/plain", b"a"),
                file("b", "text/plain", b"b"),
                file("c", "text/plain", b"c"),
            ],
            LIMITS,
            &reader(),
        )
        .await
        .unwrap_err();
        assert_eq!(e, AttachmentError::TooMany { count: 3, max: 2 });
        let e = prepare(
            &[file("big", "text/plain", &[b'x'; 101])],
            LIMITS,
            &reader(),
        )
        .await
        .unwrap_err();
        assert_eq!(e, AttachmentError::TooLarge { max: 100 });
        let e = prepare(
            &[
                file("a", "text/plain", &[b'x'; 60]),
                file("b", "text/plain", &[b'x'; 60]),
            ],
            LIMITS,
            &reader(),
        )
        .await
        .unwrap_err();
        assert_eq!(e, AttachmentError::TooLarge { max: 100 });
        let e = prepare(
            &[file("cat.png", "image/png", b"\x89PNG")],
            LIMITS,
            &reader(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("cat.png"), "{e}");
        let e = prepare(
            &[file("bin.txt", "text/plain", &[0xff, 0xfe])],
            LIMITS,
            &reader(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("bin.txt"), "{e}");
        let bad = FileAttachment {
            name: "x.txt".into(),
            content_type: "text/plain".into(),
            data: "!!!".into(),
        };
        let e = prepare(&[bad], LIMITS, &reader()).await.unwrap_err();
        assert!(matches!(e, AttachmentError::BadEncoding { .. }));
        let e = prepare(
            &[file("fake.pdf", "application/pdf", b"hello")],
            LIMITS,
            &reader(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("fake.pdf"), "{e}");
    }

    #[tokio::test]
    async fn attachment_text_is_capped_per_request() {
        let limits = FileLimits {
            max_files: 3,
            max_total_bytes: 10_000,
            max_text_chars: 50,
        };
        let files = prepare(
            &[
                file("a.txt", "text/plain", "é".repeat(30).as_bytes()),
                file("b.txt", "text/plain", &[b'b'; 40]),
                file("c.txt", "text/plain", b"never seen"),
            ],
            limits,
            &reader(),
        )
        .await
        .unwrap();
        let sizes: Vec<(usize, bool)> = files
            .iter()
            .map(|f| (f.text.chars().count(), f.truncated))
            .collect();
        assert_eq!(sizes, [(30, false), (20, true), (0, true)]);
        let m = inline("q", &files);
        assert_eq!(m.matches(TRUNCATED_NOTE).count(), 2, "{m}");
        assert!(!m.contains("never seen"));
        assert!(m.chars().count() < 50 + 400, "{m}");
    }

    #[test]
    fn base64_variants_decode() {
        assert_eq!(decode("aGk=").unwrap(), b"hi");
        assert_eq!(decode("aGk").unwrap(), b"hi");
        assert_eq!(decode("aG\nk=").unwrap(), b"hi");
        assert_eq!(decode("data:text/plain;base64,aGk=").unwrap(), b"hi");
        assert_eq!(decode("-_8").unwrap(), [0xfb, 0xff]);
    }

    #[test]
    fn names_are_cleaned() {
        assert_eq!(display_name("a\nb.txt"), "a b.txt");
        assert_eq!(display_name(""), "unnamed");
        assert_eq!(display_name(&"x".repeat(500)).len(), MAX_NAME_CHARS);
    }
}
