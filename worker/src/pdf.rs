//! Text from untrusted PDFs without letting a crafted file take the worker down.
//!
//! A PDF of a few KiB can name one content stream that inflates to megabytes as the
//! content of hundreds of pages, and lopdf holds a parsed stream at many times its
//! size. So extraction is bounded twice:
//!
//! - In the work itself ([`extract`]): every page, content stream and font is read
//!   once, however often it is referenced; decompressed bytes are charged against one
//!   budget for the whole file ([`PDF_MAX_DECOMPRESSED`], a stream at most
//!   [`PDF_MAX_STREAM`]); text stops at the caller's character cap, not after it.
//! - Around it ([`PdfReader`]): extraction runs in a child process, the worker binary
//!   itself re-executed with [`EXTRACTOR_ARG`], which caps its own address space
//!   ([`PDF_EXTRACTOR_MEMORY`]) and CPU time before reading its input, and is killed
//!   at [`PDF_TIMEOUT`]. Whatever lopdf does (load-time object streams included), the
//!   worker only sees an exit status; at most [`PDF_MAX_CONCURRENT`] children run.
//!
//! Memory bound: the worker process itself holds, per request, the decoded files (at
//! most `SB_MAX_FILES_BYTES`, 1 MiB by default) and the extracted text (at most 4
//! bytes per allowed character, 64,000 characters by default), whatever the PDF
//! contains; extraction memory lives in the children, at most
//! `PDF_MAX_CONCURRENT × PDF_EXTRACTOR_MEMORY` (2 × 256 MiB of address space) at
//! once. `worker/tests/it/pdf_bombs.rs` measures both with hostile files.
//!
//! Child protocol: argv `[worker, EXTRACTOR_ARG, max_chars]`, an empty environment
//! (no secrets in a process that parses hostile input), the PDF on stdin, and on
//! stdout one status byte then the text or the error's detail ([`encode_reply`]).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use lopdf::content::{Content, Operation};
use lopdf::{DecompressError, Document, Encoding, LoadOptions, Object, ObjectId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// PDF parsing is CPU work on untrusted input: give up after this long.
pub const PDF_TIMEOUT: Duration = Duration::from_secs(10);
/// Decompressed bytes one PDF may cost, all streams together: a real document's
/// text is long past the character cap before its page content reaches this.
pub const PDF_MAX_DECOMPRESSED: usize = 16 * 1024 * 1024;
/// One content stream may inflate to this much: lopdf parses a whole stream into
/// operations at up to ~90 times its size (measured: 1.9 MiB of `Tj` operators took
/// an extractor to 172 MiB), and a page of text is tens of KiB.
pub const PDF_MAX_STREAM: usize = 1024 * 1024;
/// Address space of an extractor process: the binary's own mappings (~20 MiB)
/// plus one parsed stream at the cap above, with room to spare; a file that
/// needs more fails as "too large when decompressed".
pub const PDF_EXTRACTOR_MEMORY: u64 = 256 * 1024 * 1024;
/// CPU seconds of an extractor: the kernel ends it even if the worker that would
/// kill it at the deadline is gone.
pub const PDF_EXTRACTOR_CPU_SECS: u64 = PDF_TIMEOUT.as_secs() + 2;
/// Extractions at once per worker: each may use a core and
/// `PDF_EXTRACTOR_MEMORY`, and the LLM streams of other requests need the rest.
pub const PDF_MAX_CONCURRENT: usize = 2;
/// A PDF waits this long for an extraction slot before the user is asked to retry:
/// a queue longer than this means the worker is flooded with PDFs.
pub const PDF_QUEUE_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes an extractor reads from stdin: the worker never sends more than
/// `SB_MAX_FILES_BYTES` (1 MiB by default); this only stops a runaway input.
pub const PDF_MAX_INPUT: usize = 16 * 1024 * 1024;
/// Error details from the reader (lopdf's messages) are cut to this many characters.
pub const MAX_REASON_CHARS: usize = 120;
/// The hidden first argument that makes the worker binary an extractor: an
/// argument, not an environment variable, so nothing inherits it and `ps` shows it.
pub const EXTRACTOR_ARG: &str = "--internal-pdf-extract";

/// Linux signal numbers (the worker runs on Linux): how an extractor ended.
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;
const SIGXCPU: i32 = 24;

/// Why a PDF gave no text. The messages are shown to the user after the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PdfError {
    #[error("not a PDF file")]
    NotPdf,
    #[error("cannot read the PDF ({0})")]
    Unreadable(String),
    #[error("no text in the PDF (a scan?)")]
    NoText,
    #[error("the PDF is too large when decompressed")]
    TooLarge,
    #[error("reading the PDF took too long")]
    Timeout,
    #[error("the PDF reader failed on this file")]
    Crashed,
    /// Not the file's fault: every extraction slot stayed taken.
    #[error("too many PDFs are being read right now; try again")]
    Busy,
    /// Not the file's fault: the extractor could not be started.
    #[error("PDF reading is unavailable right now; try again")]
    Unavailable,
}

impl PdfError {
    /// The same file may succeed later: a worker-side problem, not the file.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PdfError::Busy | PdfError::Unavailable)
    }
}

/// Bounds of one extraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Characters of text returned at most.
    pub max_chars: usize,
    /// Decompressed bytes of all streams together.
    pub max_decompressed: usize,
    /// Decompressed bytes of one stream.
    pub max_stream: usize,
}

impl Limits {
    /// The defaults with a caller's character cap.
    pub fn with_max_chars(max_chars: usize) -> Limits {
        Limits {
            max_chars,
            max_decompressed: PDF_MAX_DECOMPRESSED,
            max_stream: PDF_MAX_STREAM,
        }
    }
}

/// Text of a PDF, and whether the character cap cut it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extraction {
    pub text: String,
    pub truncated: bool,
}

/// Text collected up to a character cap.
struct Collected {
    text: String,
    chars: usize,
    max: usize,
    truncated: bool,
}

impl Collected {
    /// Appends what fits; false once the cap is reached (stop reading).
    fn push_str(&mut self, s: &str) -> bool {
        if self.truncated {
            return false;
        }
        for c in s.chars() {
            if self.chars == self.max {
                self.truncated = true;
                return false;
            }
            self.text.push(c);
            self.chars += 1;
        }
        true
    }

    fn newline(&mut self) -> bool {
        if self.text.is_empty() || self.text.ends_with('\n') {
            return !self.truncated;
        }
        self.push_str("\n")
    }
}

/// Decompressed bytes left for the rest of the file.
struct Budget {
    left: usize,
    /// A stream was refused for size: with no text at all, the file is "too large".
    refused: bool,
}

impl Budget {
    /// Decompresses `stream` within the budget; `None` if it is over (it is then
    /// charged as much as was spent finding out) or cannot be decoded.
    fn inflate(&mut self, stream: &lopdf::Stream, max_stream: usize) -> Option<Vec<u8>> {
        let cap = self.left.min(max_stream);
        match stream.decompressed_content_with_limit(cap) {
            Ok(data) => {
                self.left -= data.len();
                Some(data)
            }
            Err(lopdf::Error::Decompress(DecompressError::MemoryLimitExceeded { .. })) => {
                self.left -= cap;
                self.refused = true;
                None
            }
            Err(_) => None,
        }
    }
}

/// Synchronous, bounded extraction (runs in the extractor process; unit tests call
/// it in process). Pages come in document order; a page, content stream or font
/// referenced again is not read again.
pub fn extract(bytes: &[u8], limits: &Limits) -> Result<Extraction, PdfError> {
    if !bytes.starts_with(b"%PDF-") {
        return Err(PdfError::NotPdf);
    }
    // Object streams inflate while loading, before any budget can be kept: each is
    // held to the file's budget here, their sum by the extractor's memory limit.
    let options = LoadOptions::with_max_decompressed_size(limits.max_decompressed);
    let doc = Document::load_mem_with_options(bytes, options).map_err(|e| match e {
        lopdf::Error::Decompress(DecompressError::MemoryLimitExceeded { .. }) => PdfError::TooLarge,
        e => PdfError::Unreadable(e.to_string().chars().take(MAX_REASON_CHARS).collect()),
    })?;
    let mut out = Collected {
        text: String::new(),
        chars: 0,
        max: limits.max_chars,
        truncated: false,
    };
    let mut budget = Budget {
        left: limits.max_decompressed,
        refused: false,
    };
    let mut pages_seen = HashSet::new();
    let mut streams_seen: HashSet<ObjectId> = HashSet::new();
    let mut fonts = FontCache::default();
    let mut any_page = false;
    'pages: for page_id in doc.page_iter() {
        any_page = true;
        if !pages_seen.insert(page_id) {
            continue;
        }
        let page_fonts = fonts.for_page(&doc, page_id, &mut streams_seen, &mut budget, limits);
        for stream_id in doc.get_page_contents(page_id) {
            if budget.left == 0 {
                break 'pages;
            }
            if !streams_seen.insert(stream_id) {
                continue;
            }
            let Ok(stream) = doc.get_object(stream_id).and_then(Object::as_stream) else {
                continue;
            };
            let Some(data) = budget.inflate(stream, limits.max_stream) else {
                continue;
            };
            // A stream that does not parse is skipped: the other pages still count.
            let Ok(content) = Content::decode(&data) else {
                continue;
            };
            drop(data);
            if !show_text(&content.operations, &page_fonts, &fonts, &mut out) {
                break 'pages;
            }
        }
    }
    if !any_page {
        return Err(PdfError::Unreadable("no pages".into()));
    }
    // Content left unread for size is text missing too.
    let truncated = out.truncated || budget.refused || budget.left == 0;
    let text = out.text.trim();
    if text.is_empty() {
        return Err(if budget.refused || budget.left == 0 {
            PdfError::TooLarge
        } else {
            PdfError::NoText
        });
    }
    Ok(Extraction {
        text: text.to_owned(),
        truncated,
    })
}

/// Font encodings, each built once: pages usually share their fonts.
#[derive(Default)]
struct FontCache<'a> {
    encodings: Vec<Encoding<'a>>,
    /// By the font dictionary's address in the loaded document: `get_page_fonts`
    /// gives dictionaries, not ids, and one object is one dictionary there.
    by_font: HashMap<usize, Option<usize>>,
}

impl<'a> FontCache<'a> {
    /// The page's font names and their encodings' indexes.
    fn for_page(
        &mut self,
        doc: &'a Document,
        page_id: ObjectId,
        streams_seen: &mut HashSet<ObjectId>,
        budget: &mut Budget,
        limits: &Limits,
    ) -> HashMap<Vec<u8>, usize> {
        let mut page = HashMap::new();
        let Ok(fonts) = doc.get_page_fonts(page_id) else {
            return page;
        };
        for (name, font) in fonts {
            let key = std::ptr::from_ref(font) as usize;
            let index = match self.by_font.get(&key) {
                Some(i) => *i,
                None => {
                    let i = self.build(doc, font, streams_seen, budget, limits);
                    self.by_font.insert(key, i);
                    i
                }
            };
            if let Some(i) = index {
                page.insert(name, i);
            }
        }
        page
    }

    fn build(
        &mut self,
        doc: &'a Document,
        font: &'a lopdf::Dictionary,
        streams_seen: &mut HashSet<ObjectId>,
        budget: &mut Budget,
        limits: &Limits,
    ) -> Option<usize> {
        // A `ToUnicode` CMap is a stream too: charged once, like content streams.
        if let Ok(Object::Reference(id)) = font.get(b"ToUnicode")
            && streams_seen.insert(*id)
            && let Ok(stream) = doc.get_object(*id).and_then(Object::as_stream)
        {
            budget.inflate(stream, limits.max_stream)?;
        }
        let limit = budget.left.min(limits.max_stream);
        let encoding = font.get_font_encoding_with_limit(doc, limit).ok()?;
        self.encodings.push(encoding);
        Some(self.encodings.len() - 1)
    }
}

/// Appends the text that `ops` show (as lopdf's own `extract_text` does); false
/// once the character cap is reached.
fn show_text(
    ops: &[Operation],
    page_fonts: &HashMap<Vec<u8>, usize>,
    fonts: &FontCache<'_>,
    out: &mut Collected,
) -> bool {
    let mut encoding: Option<&Encoding<'_>> = None;
    let mut piece = String::new();
    for op in ops {
        piece.clear();
        match op.operator.as_str() {
            "Tf" => {
                encoding = op
                    .operands
                    .first()
                    .and_then(|o| o.as_name().ok())
                    .and_then(|n| page_fonts.get(n))
                    .map(|i| &fonts.encodings[*i]);
            }
            "Tj" | "TJ" => {
                if let Some(e) = encoding {
                    collect(&mut piece, e, &op.operands);
                }
            }
            "'" | "\"" => {
                if !out.newline() {
                    return false;
                }
                // `"` has two spacing operands before its string.
                let skip = if op.operator == "'" { 0 } else { 2 };
                if let Some(e) = encoding {
                    collect(&mut piece, e, op.operands.get(skip..).unwrap_or(&[]));
                }
            }
            "T*" | "ET" if !out.newline() => return false,
            _ => {}
        }
        if !piece.is_empty() && !out.push_str(&piece) {
            return false;
        }
    }
    true
}

fn collect(out: &mut String, encoding: &Encoding<'_>, operands: &[Object]) {
    for operand in operands {
        match operand {
            Object::String(bytes, _) => {
                // Undecodable bytes are dropped, like lopdf does.
                let _ = encoding.write_to_string(bytes, out);
            }
            Object::Array(items) => {
                collect(out, encoding, items);
                out.push(' ');
            }
            // A large negative kerning in `TJ` is a word gap.
            Object::Integer(i) if *i < -100 => out.push(' '),
            _ => {}
        }
    }
}

const REPLY_TEXT: u8 = b'T';
const REPLY_TRUNCATED: u8 = b'C';
const REPLY_ERROR: u8 = b'E';
/// Bytes of a reply besides the text: status, error code and detail.
const REPLY_OVERHEAD: usize = 2 + MAX_REASON_CHARS * 4;

/// The extractor's stdout for `result`.
pub fn encode_reply(result: &Result<Extraction, PdfError>) -> Vec<u8> {
    match result {
        Ok(e) => {
            let mut out = Vec::with_capacity(1 + e.text.len());
            out.push(if e.truncated {
                REPLY_TRUNCATED
            } else {
                REPLY_TEXT
            });
            out.extend_from_slice(e.text.as_bytes());
            out
        }
        Err(e) => {
            let (code, detail) = match e {
                PdfError::NotPdf => (b'P', ""),
                PdfError::Unreadable(why) => (b'U', why.as_str()),
                PdfError::NoText => (b'N', ""),
                PdfError::TooLarge => (b'L', ""),
                PdfError::Timeout => (b'T', ""),
                PdfError::Crashed | PdfError::Busy | PdfError::Unavailable => (b'X', ""),
            };
            let mut out = vec![REPLY_ERROR, code];
            out.extend_from_slice(detail.as_bytes());
            out
        }
    }
}

/// The worker's reading of an extractor's stdout.
pub fn decode_reply(reply: &[u8]) -> Result<Extraction, PdfError> {
    let text = |b: &[u8], truncated| {
        String::from_utf8(b.to_vec())
            .map(|text| Extraction { text, truncated })
            .map_err(|_| PdfError::Crashed)
    };
    match reply {
        [REPLY_TEXT, rest @ ..] => text(rest, false),
        [REPLY_TRUNCATED, rest @ ..] => text(rest, true),
        [REPLY_ERROR, code, rest @ ..] => Err(match code {
            b'P' => PdfError::NotPdf,
            b'U' => PdfError::Unreadable(
                String::from_utf8_lossy(rest)
                    .chars()
                    .take(MAX_REASON_CHARS)
                    .collect(),
            ),
            b'N' => PdfError::NoText,
            b'L' => PdfError::TooLarge,
            b'T' => PdfError::Timeout,
            _ => PdfError::Crashed,
        }),
        _ => Err(PdfError::Crashed),
    }
}

/// True when this process was started as an extractor (see `main.rs`).
pub fn is_extractor_call() -> bool {
    std::env::args_os().nth(1).as_deref() == Some(OsStr::new(EXTRACTOR_ARG))
}

/// The extractor process: limits itself, reads the PDF from stdin, writes the reply.
pub fn extractor_main() -> ExitCode {
    // Before a byte of input is read: from here on a bomb only hurts this process.
    if let Err(e) = limit_self() {
        eprintln!("worker pdf extractor: cannot set resource limits: {e}");
        return ExitCode::FAILURE;
    }
    let Some(max_chars) = std::env::args()
        .nth(2)
        .and_then(|a| a.parse::<usize>().ok())
    else {
        eprintln!("worker pdf extractor: usage: worker {EXTRACTOR_ARG} <max_chars>");
        return ExitCode::FAILURE;
    };
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin()
        .lock()
        .take(PDF_MAX_INPUT as u64)
        .read_to_end(&mut input)
    {
        eprintln!("worker pdf extractor: cannot read stdin: {e}");
        return ExitCode::FAILURE;
    }
    let reply = encode_reply(&extract(&input, &Limits::with_max_chars(max_chars)));
    drop(input);
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(&reply)
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn limit_self() -> std::io::Result<()> {
    use rlimit::Resource;
    Resource::AS.set(PDF_EXTRACTOR_MEMORY, PDF_EXTRACTOR_MEMORY)?;
    // Soft: SIGXCPU; hard, a second later: SIGKILL.
    Resource::CPU.set(PDF_EXTRACTOR_CPU_SECS, PDF_EXTRACTOR_CPU_SECS + 1)?;
    // An abort on a failed allocation must not write a core file of hostile data.
    Resource::CORE.set(0, 0)?;
    Ok(())
}

/// Runs extractions in child processes: bounded in number, time and memory.
#[derive(Debug)]
pub struct PdfReader {
    /// The worker binary; `None` if it could not be found (PDFs are then refused).
    program: Option<PathBuf>,
    slots: Semaphore,
    timeout: Duration,
}

impl PdfReader {
    pub fn new(program: Option<PathBuf>) -> PdfReader {
        PdfReader::with_timeout(program, PDF_TIMEOUT)
    }

    /// With another deadline than [`PDF_TIMEOUT`] (tests).
    pub fn with_timeout(program: Option<PathBuf>, timeout: Duration) -> PdfReader {
        PdfReader {
            program,
            slots: Semaphore::new(PDF_MAX_CONCURRENT),
            timeout,
        }
    }

    /// The text of a PDF, at most `max_chars` characters of it.
    pub async fn extract(&self, bytes: &[u8], max_chars: usize) -> Result<Extraction, PdfError> {
        // No process for what is not even a PDF.
        if !bytes.starts_with(b"%PDF-") {
            return Err(PdfError::NotPdf);
        }
        let Some(program) = &self.program else {
            return Err(PdfError::Unavailable);
        };
        let _slot = tokio::time::timeout(PDF_QUEUE_TIMEOUT, self.slots.acquire())
            .await
            .map_err(|_| PdfError::Busy)?
            .map_err(|_| PdfError::Unavailable)?;
        let mut child = tokio::process::Command::new(program)
            .arg(EXTRACTOR_ARG)
            .arg(max_chars.to_string())
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // A request dropped mid-extraction (shutdown, abort) kills its child too.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                tracing::warn!(error = %e, program = %program.display(), "cannot start the PDF extractor");
                PdfError::Unavailable
            })?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(PdfError::Unavailable);
        };
        let max_reply = max_chars.saturating_mul(4).saturating_add(REPLY_OVERHEAD);
        let work = async {
            let write = async {
                // The child may stop reading early (not a PDF, over a limit): fine.
                let _ = stdin.write_all(bytes).await;
                drop(stdin);
            };
            let read = async {
                let mut reply = Vec::new();
                let mut limited = stdout.take(max_reply as u64 + 1);
                limited.read_to_end(&mut reply).await.map(|_| reply)
            };
            let ((), reply) = tokio::join!(write, read);
            match reply {
                Ok(r) if r.len() <= max_reply => Some((r, child.wait().await)),
                // More than it may send, or a broken pipe: do not wait for it.
                _ => None,
            }
        };
        let ended = tokio::time::timeout(self.timeout, work).await;
        let (reply, status) = match ended {
            Ok(Some((reply, Ok(status)))) => (reply, status),
            Ok(_) => {
                stop(&mut child).await;
                return Err(PdfError::Crashed);
            }
            Err(_) => {
                stop(&mut child).await;
                return Err(PdfError::Timeout);
            }
        };
        if status.success() {
            return decode_reply(&reply);
        }
        Err(failure(status))
    }
}

/// Kills and reaps a child (no zombie left behind).
async fn stop(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// What an extractor's abnormal end means for the user.
fn failure(status: ExitStatus) -> PdfError {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        // An allocation refused under the address-space limit aborts; the kernel's
        // OOM killer sends SIGKILL (the deadline's kill is handled by the caller).
        Some(SIGABRT | SIGKILL) => PdfError::TooLarge,
        Some(SIGXCPU) => PdfError::Timeout,
        _ => {
            tracing::warn!(%status, "the PDF extractor failed");
            PdfError::Crashed
        }
    }
}

#[cfg(test)]
mod tests {
    use lopdf::{Stream, dictionary};

    use super::*;

    /// Text-showing operators for `lines` lines starting with `tag`, like a page of
    /// a report.
    fn content(tag: &str, lines: usize) -> Vec<u8> {
        let mut c = String::from("BT /F1 12 Tf 72 700 Td\n");
        for i in 0..lines {
            c.push_str(&format!("({tag} line {i} of the text) Tj T*\n"));
        }
        c.push_str("ET\n");
        c.into_bytes()
    }

    /// A PDF with the given content streams; page `i` shows stream `pages[i]`.
    fn pdf(streams: &[Vec<u8>], pages: &[usize]) -> Vec<u8> {
        let mut doc = Document::with_version("1.5");
        let pages_id = doc.new_object_id();
        let font_id = doc.add_object(dictionary! {
            "Type" => "Font",
            "Subtype" => "Type1",
            "BaseFont" => "Courier",
        });
        let resources_id = doc.add_object(dictionary! {
            "Font" => dictionary! { "F1" => font_id },
        });
        let stream_ids: Vec<ObjectId> = streams
            .iter()
            .map(|c| {
                let mut s = Stream::new(dictionary! {}, c.clone());
                s.compress().unwrap();
                doc.add_object(s)
            })
            .collect();
        let kids: Vec<Object> = pages
            .iter()
            .map(|&i| {
                doc.add_object(dictionary! {
                    "Type" => "Page",
                    "Parent" => pages_id,
                    "Contents" => stream_ids[i],
                })
                .into()
            })
            .collect();
        doc.objects.insert(
            pages_id,
            Object::Dictionary(dictionary! {
                "Type" => "Pages",
                "Count" => kids.len() as i64,
                "Kids" => kids,
                "Resources" => resources_id,
                "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
            }),
        );
        let catalog_id = doc.add_object(dictionary! {
            "Type" => "Catalog",
            "Pages" => pages_id,
        });
        doc.trailer.set("Root", catalog_id);
        let mut out = Vec::new();
        doc.save_to(&mut out).unwrap();
        out
    }

    fn limits(max_chars: usize, max_decompressed: usize) -> Limits {
        Limits {
            max_chars,
            max_decompressed,
            max_stream: PDF_MAX_STREAM,
        }
    }

    #[test]
    fn text_comes_out_in_page_order() {
        let file = pdf(&[content("alpha", 2), content("beta", 2)], &[0, 1]);
        let e = extract(&file, &limits(10_000, PDF_MAX_DECOMPRESSED)).unwrap();
        assert!(!e.truncated);
        let alpha = e.text.find("alpha line 1").unwrap();
        let beta = e.text.find("beta line 0").unwrap();
        assert!(alpha < beta, "{}", e.text);
    }

    #[test]
    fn decompressed_bytes_are_capped_across_pages() {
        // Three streams of ~150 KB each, on three pages: each is far under the
        // per-stream cap, but together they are over the file's budget.
        let streams = [
            content("first", 4000),
            content("second", 4000),
            content("third", 4000),
        ];
        let one = streams[0].len();
        assert!(one > 100_000, "{one}");
        let file = pdf(&streams, &[0, 1, 2]);
        let e = extract(&file, &limits(usize::MAX, 2 * one + one / 2)).unwrap();
        assert!(e.text.contains("second line 3999"));
        assert!(!e.text.contains("third line"), "read past the budget");
        assert!(e.truncated, "a cut file says so");
        // Under a budget too small for even one stream, nothing is read.
        assert_eq!(
            extract(&file, &limits(usize::MAX, one / 2)),
            Err(PdfError::TooLarge)
        );
    }

    #[test]
    fn a_stream_shared_by_many_pages_is_read_once() {
        let shared = content("shared", 4000);
        let size = shared.len();
        let file = pdf(&[shared], &[0; 300]);
        // Room for the stream once; 300 reads would be 300 times over.
        let e = extract(&file, &limits(usize::MAX, size + size / 2)).unwrap();
        assert!(!e.truncated);
        assert_eq!(e.text.matches("shared line 3999 ").count(), 1);
    }

    #[test]
    fn text_stops_at_the_character_cap() {
        let file = pdf(&[content("x", 4000)], &[0, 0]);
        let e = extract(&file, &limits(1000, PDF_MAX_DECOMPRESSED)).unwrap();
        assert!(e.truncated);
        assert!(e.text.chars().count() <= 1000);
        assert!(e.text.starts_with("x line 0 of the text"), "{}", e.text);
    }

    #[test]
    fn a_stream_over_the_stream_cap_is_too_large() {
        let file = pdf(&[content("big", 4000)], &[0]);
        let l = Limits {
            max_stream: 10_000,
            ..limits(usize::MAX, PDF_MAX_DECOMPRESSED)
        };
        assert_eq!(extract(&file, &l), Err(PdfError::TooLarge));
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(extract(b"hello", &limits(10, 10)), Err(PdfError::NotPdf));
        assert!(matches!(
            extract(b"%PDF-1.5\nnonsense", &limits(10, 10)),
            Err(PdfError::Unreadable(_))
        ));
    }

    #[test]
    fn replies_round_trip() {
        let cases = [
            Ok(Extraction {
                text: "héllo".into(),
                truncated: false,
            }),
            Ok(Extraction {
                text: "cut".into(),
                truncated: true,
            }),
            Err(PdfError::NotPdf),
            Err(PdfError::Unreadable("bad xref".into())),
            Err(PdfError::NoText),
            Err(PdfError::TooLarge),
            Err(PdfError::Timeout),
        ];
        for c in cases {
            assert_eq!(decode_reply(&encode_reply(&c)), c);
        }
        assert_eq!(decode_reply(b""), Err(PdfError::Crashed));
        assert_eq!(decode_reply(b"T\xff"), Err(PdfError::Crashed));
    }

    /// A stand-in extractor: a shell script that records its pid, then `body`.
    fn script(dir: &tempfile::TempDir, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("extractor.sh");
        let pid = dir.path().join("pid");
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho $$ > {}\n{body}\n", pid.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn alive(dir: &tempfile::TempDir) -> bool {
        let pid = std::fs::read_to_string(dir.path().join("pid")).unwrap();
        std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
    }

    #[tokio::test]
    async fn the_deadline_kills_the_extractor() {
        let dir = tempfile::tempdir().unwrap();
        let program = script(&dir, "exec sleep 30");
        let reader = PdfReader::with_timeout(Some(program), Duration::from_millis(300));
        let started = std::time::Instant::now();
        assert_eq!(
            reader.extract(b"%PDF-1.5", 100).await,
            Err(PdfError::Timeout)
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!alive(&dir), "the extractor outlived its deadline");
    }

    #[tokio::test]
    async fn extractor_failures_become_file_errors() {
        let text = Extraction {
            text: "some text".into(),
            truncated: false,
        };
        for (body, want) in [
            ("kill -ABRT $$", Err(PdfError::TooLarge)),
            ("kill -XCPU $$", Err(PdfError::Timeout)),
            ("exit 3", Err(PdfError::Crashed)),
            ("printf 'EL'", Err(PdfError::TooLarge)),
            ("printf 'Tsome text'", Ok(text)),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let reader = PdfReader::new(Some(script(&dir, &format!("cat > /dev/null; {body}"))));
            assert_eq!(reader.extract(b"%PDF-1.5", 100).await, want, "{body}");
        }
        let reader = PdfReader::new(Some("/nonexistent/worker".into()));
        assert_eq!(
            reader.extract(b"%PDF-1.5", 100).await,
            Err(PdfError::Unavailable)
        );
        assert_eq!(reader.extract(b"GIF89a", 100).await, Err(PdfError::NotPdf));
    }

    #[tokio::test]
    async fn a_reply_longer_than_allowed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // 10 characters allowed: at most 40 bytes of text plus the overhead.
        let reader = PdfReader::new(Some(script(
            &dir,
            "cat > /dev/null; yes T | head -c 100000",
        )));
        assert_eq!(
            reader.extract(b"%PDF-1.5", 10).await,
            Err(PdfError::Crashed)
        );
    }
}
