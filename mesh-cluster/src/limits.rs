//! Limits on each file of the config directory, checked before its text reaches the YAML parser,
//! so that a bad file costs milliseconds and never holds up the other files' changes.
//!
//! - **Size** ([`FileLimits::max_file_bytes`], `--config-max-file-bytes`, default
//!   [`DEFAULT_MAX_FILE_BYTES`]): checked on the file's metadata before it is read, and again
//!   while reading (a file that grows in between is not read past the limit). Parsing costs
//!   memory in proportion: 12 to 25 bytes per byte of ordinary Kubernetes YAML (64 MB and a
//!   quarter of a second for a 2.5 MB list of pods), up to about 250 for text made only of tiny
//!   nested collections (`[[[]]],[[[]]],…`). The default holds the largest object Kubernetes
//!   stores (etcd takes 1.5 MiB) and a `kubectl get -o yaml` list of about a thousand pods.
//! - **Nesting depth** ([`FileLimits::max_depth`], `--config-max-depth`, default
//!   [`DEFAULT_MAX_DEPTH`]): how many collections (mappings and sequences) may be open inside
//!   one another. Checked by [`check_depth`], one pass over the text that follows the YAML
//!   scanner (libyaml's, which `serde_yaml` uses) only as far as nesting goes: flow collections
//!   (`[`, `{`, and the single-pair mappings of `[a: b]`) outside quoted scalars, comments,
//!   block scalars and plain scalars; block collections by their indentation, as the scanner
//!   opens them (a `- ` entry or a key further right than the enclosing collection, and a
//!   sequence at its key's indentation). Pods as `kubectl get -o yaml` lists them nest 14 deep
//!   with their managed fields; the default leaves room for deeper objects the agent skips
//!   (`CustomResourceDefinition` schemas). `serde_yaml` itself refuses anything deeper than 128
//!   ([`MAX_MAX_DEPTH`]), but only after libyaml has read the whole document, which for text
//!   like `[a: [a: …` takes time quadratic in its depth (a minute for 400 KB).

use std::fmt;

/// Default [`FileLimits::max_file_bytes`]: 4 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 4 << 20;
/// Smallest accepted [`FileLimits::max_file_bytes`]: 4 KiB (one object with its status).
pub const MIN_MAX_FILE_BYTES: u64 = 4 << 10;
/// Largest accepted [`FileLimits::max_file_bytes`]: 64 MiB (parsing it may take gigabytes).
pub const MAX_MAX_FILE_BYTES: u64 = 64 << 20;
/// Default [`FileLimits::max_depth`].
pub const DEFAULT_MAX_DEPTH: usize = 64;
/// Smallest accepted [`FileLimits::max_depth`] (Pods as `kubectl get -o yaml` lists them, with
/// their managed fields, are 14 deep).
pub const MIN_MAX_DEPTH: usize = 16;
/// Largest accepted [`FileLimits::max_depth`]: `serde_yaml` refuses deeper documents anyway.
pub const MAX_MAX_DEPTH: usize = 128;

/// What one file of the config directory may hold; see the [module](self) documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLimits {
    /// Largest file read, in bytes ([`MIN_MAX_FILE_BYTES`] to [`MAX_MAX_FILE_BYTES`]).
    pub max_file_bytes: u64,
    /// Deepest nesting of collections parsed ([`MIN_MAX_DEPTH`] to [`MAX_MAX_DEPTH`]).
    pub max_depth: usize,
}

impl Default for FileLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

impl FileLimits {
    /// Checks that both limits are within their ranges.
    pub fn validate(&self) -> Result<(), LimitError> {
        if !(MIN_MAX_FILE_BYTES..=MAX_MAX_FILE_BYTES).contains(&self.max_file_bytes) {
            return Err(LimitError::MaxFileBytes(self.max_file_bytes));
        }
        if !(MIN_MAX_DEPTH..=MAX_MAX_DEPTH).contains(&self.max_depth) {
            return Err(LimitError::MaxDepth(self.max_depth));
        }
        Ok(())
    }
}

impl fmt::Display for FileLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config_max_file_bytes={} config_max_depth={}",
            self.max_file_bytes, self.max_depth
        )
    }
}

/// A limit out of its range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// [`FileLimits::max_file_bytes`] is out of range.
    #[error(
        "config file size limit (--config-max-file-bytes): {0} bytes is out of range \
         ({MIN_MAX_FILE_BYTES} to {MAX_MAX_FILE_BYTES})"
    )]
    MaxFileBytes(u64),
    /// [`FileLimits::max_depth`] is out of range.
    #[error(
        "config nesting depth limit (--config-max-depth): {0} is out of range \
         ({MIN_MAX_DEPTH} to {MAX_MAX_DEPTH})"
    )]
    MaxDepth(usize),
}

/// A text that nests deeper than allowed: found by [`check_depth`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooDeep {
    /// The deepest nesting in the whole text.
    pub depth: usize,
    /// Line (1-based) where the nesting first went over the limit.
    pub line: usize,
    /// Column (1-based, in characters) where it did.
    pub column: usize,
}

/// Fails if collections nest more than `max_depth` deep anywhere in `text` (every document of
/// it); one pass, linear in the length of `text`, whatever its content.
///
/// The count follows what libyaml will open, so that a text accepted here is not deeper for
/// `serde_yaml`: it may count a level too many in a text that libyaml refuses anyway (a tag
/// followed by `[`, a `- ` where a sequence cannot start), and should never count one too few
/// (the tests compare the two). An alias counts as a scalar: `serde_yaml` expands it, and
/// refuses what that makes deeper than 128 itself.
pub fn check_depth(text: &str, max_depth: usize) -> Result<(), TooDeep> {
    let mut scanner = Scanner::new(text.as_bytes(), max_depth);
    scanner.run();
    match scanner.over {
        None => Ok(()),
        Some((line, column)) => Err(TooDeep {
            depth: scanner.deepest,
            line,
            column,
        }),
    }
}

/// The deepest nesting of collections in `text`, as [`check_depth`] counts it.
pub fn nesting_depth(text: &str) -> usize {
    let mut scanner = Scanner::new(text.as_bytes(), usize::MAX);
    scanner.run();
    scanner.deepest
}

/// A block collection open at a column (libyaml's indentation stack).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    column: usize,
    kind: BlockKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockKind {
    Mapping,
    Sequence,
    /// A sequence at the same indentation as the key whose value it is (`key:\n- a`): libyaml
    /// opens no indentation level for it, but it is one more level of nesting.
    Indentless,
}

/// A flow collection: `[` or `{`.
#[derive(Clone, Copy, Debug)]
struct Flow {
    sequence: bool,
    /// A single-pair mapping is open in this flow sequence (`[a: b]`): one more level.
    pair: bool,
}

/// The nesting-only YAML scanner behind [`check_depth`]. It mirrors libyaml's scanner
/// (`yaml_parser_fetch_next_token` and the scalar scanners) in what decides where collections
/// open and close, and skips over everything else.
struct Scanner<'t> {
    text: &'t [u8],
    pos: usize,
    /// 1-based.
    line: usize,
    /// 0-based, in characters.
    column: usize,
    block: Vec<Block>,
    flow: Vec<Flow>,
    /// Levels open in `flow` (a flow sequence with an open pair counts two).
    flow_depth: usize,
    /// libyaml's `simple_key_allowed` (block context).
    key_allowed: bool,
    /// Line and column of the node that may turn out to be a block mapping's key.
    pending_key: Option<(usize, usize)>,
    limit: usize,
    deepest: usize,
    /// Where the depth first went over `limit` (1-based line and column).
    over: Option<(usize, usize)>,
}

impl<'t> Scanner<'t> {
    fn new(text: &'t [u8], limit: usize) -> Self {
        Self {
            text,
            pos: 0,
            line: 1,
            column: 0,
            block: Vec::new(),
            flow: Vec::new(),
            flow_depth: 0,
            key_allowed: true,
            pending_key: None,
            limit,
            deepest: 0,
            over: None,
        }
    }

    fn run(&mut self) {
        let mut last = None;
        loop {
            // Every token moves on; should one not, this keeps the scan linear all the same.
            if last == Some(self.pos) {
                self.advance(1);
            }
            last = Some(self.pos);
            self.skip_to_token();
            let Some(byte) = self.peek(0) else {
                return;
            };
            if self.flow.is_empty() {
                self.unroll(byte);
            }
            if self.column == 0 {
                if byte == b'%' {
                    self.skip_to_break(); // a directive
                    continue;
                }
                if self.document_marker() {
                    self.new_document();
                    continue;
                }
            }
            match byte {
                b'[' | b'{' => {
                    self.node_start();
                    self.open_flow(byte == b'[');
                }
                b']' | b'}' => self.close_flow(),
                b',' => {
                    self.end_pair();
                    self.advance(1);
                }
                b'-' if self.blankz_at(1) => self.block_entry(),
                b'?' if !self.flow.is_empty() || self.blankz_at(1) => self.explicit_key(),
                b':' if !self.flow.is_empty() || self.blankz_at(1) => self.value(),
                b'*' | b'&' => {
                    self.node_start();
                    self.advance(1);
                    while self
                        .peek(0)
                        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    {
                        self.advance(1);
                    }
                }
                b'!' => {
                    self.node_start();
                    self.tag();
                }
                b'|' | b'>' if self.flow.is_empty() => self.block_scalar(),
                b'\'' | b'"' => {
                    self.node_start();
                    self.quoted(byte);
                }
                _ => {
                    self.node_start();
                    self.plain();
                }
            }
        }
    }

    // -- position ---------------------------------------------------------------------------

    fn peek(&self, offset: usize) -> Option<u8> {
        self.text.get(self.pos + offset).copied()
    }

    /// Length of the line break at `pos + offset` (libyaml's: CR, LF, CR LF, NEL, LS, PS), or 0.
    fn break_at(&self, offset: usize) -> usize {
        let rest = self.text.get(self.pos + offset..).unwrap_or_default();
        match rest {
            [b'\r', b'\n', ..] | [0xC2, 0x85, ..] => 2,
            [b'\r' | b'\n', ..] => 1,
            [0xE2, 0x80, 0xA8 | 0xA9, ..] => 3,
            _ => 0,
        }
    }

    /// A blank (space or tab), a line break or the end of the text at `pos + offset`.
    fn blankz_at(&self, offset: usize) -> bool {
        match self.peek(offset) {
            None | Some(b' ' | b'\t') => true,
            Some(_) => self.break_at(offset) > 0,
        }
    }

    /// Moves over `bytes` bytes of one line, counting columns in characters.
    fn advance(&mut self, bytes: usize) {
        let end = (self.pos + bytes).min(self.text.len());
        let chars = self.text[self.pos..end]
            .iter()
            .filter(|b| (**b & 0xC0) != 0x80)
            .count();
        self.column += chars;
        self.pos = end;
    }

    /// Moves over the line break at `pos` if there is one; returns whether there was.
    fn consume_break(&mut self) -> bool {
        let len = self.break_at(0);
        if len == 0 {
            return false;
        }
        self.pos += len;
        self.line += 1;
        self.column = 0;
        true
    }

    /// Moves to the next line break (or the end of the text), not over it.
    fn skip_to_break(&mut self) {
        while self.pos < self.text.len() && self.break_at(0) == 0 {
            self.advance(1);
        }
    }

    /// libyaml's `yaml_parser_scan_to_next_token`: blanks, comments and line breaks.
    fn skip_to_token(&mut self) {
        loop {
            if self.column == 0 && self.text[self.pos..].starts_with(b"\xEF\xBB\xBF") {
                self.pos += 3; // a byte order mark
            }
            while matches!(self.peek(0), Some(b' ' | b'\t')) {
                self.advance(1);
            }
            if self.peek(0) == Some(b'#') {
                self.skip_to_break();
            }
            if !self.consume_break() {
                return;
            }
            if self.flow.is_empty() {
                self.key_allowed = true;
            }
        }
    }

    /// `---` or `...` (at column 0) followed by a blank, a break or the end.
    fn document_marker(&self) -> bool {
        let rest = &self.text[self.pos..];
        (rest.starts_with(b"---") || rest.starts_with(b"...")) && self.blankz_at(3)
    }

    // -- depth ------------------------------------------------------------------------------

    fn depth(&self) -> usize {
        self.block.len() + self.flow_depth
    }

    /// Records the depth after a level opened at `line`, `column` (0-based).
    fn opened(&mut self, line: usize, column: usize) {
        let depth = self.depth();
        self.deepest = self.deepest.max(depth);
        if depth > self.limit && self.over.is_none() {
            self.over = Some((line, column + 1));
        }
    }

    /// libyaml's current indentation: the column of the innermost block collection, or -1.
    fn indent(&self) -> isize {
        self.block.last().map_or(-1, |b| b.column.cast_signed())
    }

    /// Opens a block collection at `column` unless one is open at that column or further
    /// right (libyaml's `yaml_parser_roll_indent`).
    fn roll(&mut self, line: usize, column: usize, kind: BlockKind) {
        if self.indent() < column.cast_signed() {
            self.block.push(Block { column, kind });
            self.opened(line, column);
        }
    }

    /// Closes the block collections a token at the current column ends: those further right
    /// (libyaml's `yaml_parser_unroll_indent`), and a sequence at its key's indentation when
    /// the token is not one of its entries.
    fn unroll(&mut self, byte: u8) {
        while self.indent() > self.column.cast_signed() {
            self.block.pop();
        }
        if let Some(top) = self.block.last() {
            let entry = byte == b'-' && self.blankz_at(1);
            if top.kind == BlockKind::Indentless && top.column == self.column && !entry {
                self.block.pop();
            }
        }
    }

    // -- tokens -----------------------------------------------------------------------------

    /// A node starts here: in block context it may be a mapping's key (libyaml's
    /// `yaml_parser_save_simple_key`), and no other key may start before the next line.
    fn node_start(&mut self) {
        if self.flow.is_empty() && self.key_allowed {
            self.pending_key = Some((self.line, self.column));
        }
        self.key_allowed = false;
    }

    fn open_flow(&mut self, sequence: bool) {
        let (line, column) = (self.line, self.column);
        self.flow.push(Flow {
            sequence,
            pair: false,
        });
        self.flow_depth += 1;
        self.opened(line, column);
        self.advance(1);
    }

    fn close_flow(&mut self) {
        if let Some(flow) = self.flow.pop() {
            self.flow_depth -= 1 + usize::from(flow.pair);
        }
        self.advance(1);
        if self.flow.is_empty() {
            self.key_allowed = false;
        }
    }

    /// A single-pair mapping opens in the innermost flow sequence (`[a: b]`, `[? a]`).
    fn start_pair(&mut self) {
        let (line, column) = (self.line, self.column);
        if let Some(flow) = self.flow.last_mut() {
            if flow.sequence && !flow.pair {
                flow.pair = true;
                self.flow_depth += 1;
                self.opened(line, column);
            }
        }
    }

    /// `,`: the innermost flow sequence's single-pair mapping, if any, ends.
    fn end_pair(&mut self) {
        if let Some(flow) = self.flow.last_mut() {
            if flow.pair {
                flow.pair = false;
                self.flow_depth -= 1;
            }
        }
    }

    /// `- `: in block context, an entry of a block sequence, opened here if needed.
    fn block_entry(&mut self) {
        if self.flow.is_empty() && self.key_allowed {
            let (line, column) = (self.line, self.column);
            match self.block.last() {
                Some(top) if top.column == column => {
                    if top.kind == BlockKind::Mapping {
                        self.block.push(Block {
                            column,
                            kind: BlockKind::Indentless,
                        });
                        self.opened(line, column);
                    }
                }
                _ => self.roll(line, column, BlockKind::Sequence),
            }
            self.pending_key = None;
        }
        self.advance(1);
    }

    /// `? `: an explicit key.
    fn explicit_key(&mut self) {
        if self.flow.is_empty() {
            if self.key_allowed {
                self.roll(self.line, self.column, BlockKind::Mapping);
                self.pending_key = None;
            }
        } else {
            self.start_pair();
        }
        self.advance(1);
    }

    /// `: `: a value; in block context the mapping opens at its key (libyaml's
    /// `yaml_parser_fetch_value`).
    fn value(&mut self) {
        if self.flow.is_empty() {
            match self.pending_key.take() {
                Some((line, column)) if line == self.line => {
                    self.roll(line, column, BlockKind::Mapping);
                    self.key_allowed = false;
                }
                _ if self.key_allowed => self.roll(self.line, self.column, BlockKind::Mapping),
                _ => {} // libyaml: "mapping values are not allowed in this context"
            }
        } else {
            self.start_pair();
        }
        self.advance(1);
    }

    /// A tag: `!<verbatim>` or `!handle!suffix`. libyaml refuses a tag not followed by a blank
    /// (or `,` in a flow collection), so this stops at flow indicators too, to count them.
    fn tag(&mut self) {
        self.advance(1);
        if self.peek(0) == Some(b'<') {
            while !self.blankz_at(0) && self.peek(0) != Some(b'>') {
                self.advance(1);
            }
        }
        while !self.blankz_at(0) && !matches!(self.peek(0), Some(b'[' | b']' | b'{' | b'}' | b','))
        {
            self.advance(1);
        }
    }

    /// A single- or double-quoted scalar, possibly over several lines.
    fn quoted(&mut self, quote: u8) {
        self.advance(1);
        loop {
            if self.column == 0 && self.document_marker() {
                return; // libyaml: "found unexpected document indicator"
            }
            match self.peek(0) {
                None => return,
                Some(b'\'') if quote == b'\'' && self.peek(1) == Some(b'\'') => self.advance(2),
                Some(b'\\') if quote == b'"' => {
                    self.advance(1);
                    if !self.consume_break() {
                        self.advance(1);
                    }
                }
                Some(byte) if byte == quote => {
                    self.advance(1);
                    return;
                }
                Some(_) => {
                    if !self.consume_break() {
                        self.advance(1);
                    }
                }
            }
        }
    }

    /// A plain scalar (libyaml's `yaml_parser_scan_plain_scalar`): in a flow collection it ends
    /// at `,[]{}`; in block context it goes on over further lines indented more than the
    /// enclosing collection. Quotes and brackets inside it are text.
    fn plain(&mut self) {
        let indent = self.indent() + 1;
        let mut multiline = false;
        let start = self.pos;
        'scalar: loop {
            if (self.column == 0 && self.document_marker()) || self.peek(0) == Some(b'#') {
                break;
            }
            while !self.blankz_at(0) {
                let byte = self.text[self.pos];
                let flow = !self.flow.is_empty();
                // In a flow collection, libyaml refuses `:` before a flow indicator.
                let colon_ends = self.blankz_at(1)
                    || (flow
                        && matches!(self.peek(1), Some(b',' | b'?' | b'[' | b']' | b'{' | b'}')));
                let ends = (byte == b':' && colon_ends)
                    || (flow && matches!(byte, b',' | b'[' | b']' | b'{' | b'}'));
                if ends && self.pos > start {
                    break 'scalar;
                }
                self.advance(1);
            }
            if self.peek(0).is_none() {
                break;
            }
            loop {
                if matches!(self.peek(0), Some(b' ' | b'\t')) {
                    self.advance(1);
                } else if self.consume_break() {
                    multiline = true;
                } else {
                    break;
                }
            }
            if self.flow.is_empty() && self.column.cast_signed() < indent {
                break;
            }
        }
        if multiline && self.flow.is_empty() {
            self.key_allowed = true;
        }
    }

    /// A literal (`|`) or folded (`>`) block scalar: its header, then every line indented at
    /// least as much as its content (libyaml's `yaml_parser_scan_block_scalar`).
    fn block_scalar(&mut self) {
        self.pending_key = None;
        self.key_allowed = true;
        self.advance(1);
        let (mut increment, mut chomping) = (0, false);
        for _ in 0..2 {
            match self.peek(0) {
                Some(b'+' | b'-') if !chomping => {
                    chomping = true;
                    self.advance(1);
                }
                Some(digit @ b'1'..=b'9') if increment == 0 => {
                    increment = usize::from(digit - b'0');
                    self.advance(1);
                }
                _ => break,
            }
        }
        while matches!(self.peek(0), Some(b' ' | b'\t')) {
            self.advance(1);
        }
        if self.peek(0) == Some(b'#') {
            self.skip_to_break();
        }
        if !self.consume_break() {
            return; // the end of the text, or libyaml refuses the header: scan on from here
        }
        let parent = self.indent();
        let mut indent = match (increment, usize::try_from(parent)) {
            (0, _) => 0,
            (increment, Ok(parent)) => parent + increment,
            (increment, Err(_)) => increment,
        };
        if !self.block_scalar_breaks(&mut indent, parent) {
            return;
        }
        while self.column == indent && self.pos < self.text.len() {
            self.skip_to_break();
            if !self.consume_break() || !self.block_scalar_breaks(&mut indent, parent) {
                return;
            }
        }
    }

    /// Empty lines of a block scalar, and the indentation of the next line up to `indent`
    /// (found from the first non-empty line when 0). False where libyaml would refuse a tab.
    fn block_scalar_breaks(&mut self, indent: &mut usize, parent: isize) -> bool {
        let mut max_indent = 0;
        loop {
            while (*indent == 0 || self.column < *indent) && self.peek(0) == Some(b' ') {
                self.advance(1);
            }
            max_indent = max_indent.max(self.column);
            if (*indent == 0 || self.column < *indent) && self.peek(0) == Some(b'\t') {
                return false;
            }
            if !self.consume_break() {
                break;
            }
        }
        if *indent == 0 {
            let below_parent = usize::try_from(parent + 1).unwrap_or(0);
            *indent = max_indent.max(below_parent).max(1);
        }
        true
    }

    /// A document marker: everything open closes.
    fn new_document(&mut self) {
        self.block.clear();
        self.flow.clear();
        self.flow_depth = 0;
        self.pending_key = None;
        self.key_allowed = false;
        self.advance(3);
    }
}

#[cfg(test)]
mod tests;
