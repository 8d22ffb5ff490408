//! Incremental line splitting for streamed bodies: `\n`, `\r\n` and `\r` all end a
//! line (SSE allows each), a `\r\n` split across two reads counts once, and a line
//! longer than the limit is an error instead of unbounded memory.

/// A line longer than the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line longer than {0} bytes")]
pub struct LineTooLong(pub usize);

/// Splits a byte stream into lines. Lines are only decoded once complete, so a
/// multi-byte UTF-8 character split across two reads is never cut.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    after_cr: bool,
    max: usize,
}

impl LineSplitter {
    pub fn new(max_line_bytes: usize) -> LineSplitter {
        LineSplitter {
            buf: Vec::new(),
            after_cr: false,
            max: max_line_bytes,
        }
    }

    /// Appends `data`; every line it completes is pushed to `out` (without its end).
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<String>) -> Result<(), LineTooLong> {
        while !data.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if data[0] == b'\n' {
                    data = &data[1..];
                    continue;
                }
            }
            match data.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    self.extend(&data[..i])?;
                    out.push(self.take());
                    self.after_cr = data[i] == b'\r';
                    data = &data[i + 1..];
                }
                None => {
                    self.extend(data)?;
                    data = &[];
                }
            }
        }
        Ok(())
    }

    /// End of input: a last line without its line end is still a line.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        if !self.buf.is_empty() {
            out.push(self.take());
        }
        self.after_cr = false;
    }

    fn extend(&mut self, bytes: &[u8]) -> Result<(), LineTooLong> {
        if self.buf.len() + bytes.len() > self.max {
            return Err(LineTooLong(self.max));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(parts: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::new(64);
        let mut out = Vec::new();
        for p in parts {
            s.feed(p, &mut out).unwrap();
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn every_line_end_counts_once() {
        assert_eq!(split(&[b"a\nb\r\nc\rd"]), ["a", "b", "c", "d"]);
        assert_eq!(split(&[b"a\r", b"\nb\n"]), ["a", "b"]);
        assert_eq!(split(&[b"a\r", b"\r\n"]), ["a", ""]);
        assert_eq!(split(&[b"\n\n"]), ["", ""]);
    }

    #[test]
    fn utf8_split_across_reads_survives() {
        let s = "héllo €\n".as_bytes();
        let (a, b) = s.split_at(2);
        let (b, c) = b.split_at(5);
        assert_eq!(split(&[a, b, c]), ["héllo €"]);
    }

    #[test]
    fn long_lines_are_refused() {
        let mut s = LineSplitter::new(4);
        let mut out = Vec::new();
        assert!(s.feed(b"abcd\n", &mut out).is_ok());
        assert_eq!(s.feed(b"abc", &mut out), Ok(()));
        assert_eq!(s.feed(b"de", &mut out), Err(LineTooLong(4)));
    }
}
