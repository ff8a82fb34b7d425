//! gRPC messages counted in a body's bytes, for Istio's `istio_request_messages_total` and
//! `istio_response_messages_total`: each message is a 5-byte prefix (a compression flag and a
//! 4-byte big-endian length) and that many bytes, whatever HTTP/2 frames carry them.

/// Where a body's bytes stand in its gRPC messages, and how many have started.
#[derive(Debug, Default)]
pub(crate) struct MessageCount {
    /// Bytes of the current prefix seen (0-5).
    prefix_seen: usize,
    /// The current prefix's length bytes, as seen.
    length: [u8; 4],
    /// Bytes of the current message still to come.
    left: u64,
    /// Messages started.
    pub(crate) messages: u64,
}

impl MessageCount {
    /// Counts the messages that start in `data`, the body's next bytes.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let skipped = usize::try_from(self.left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.left -= skipped as u64;
                data = &data[skipped..];
                continue;
            }
            // A prefix: the flag, then the length.
            if self.prefix_seen == 0 {
                self.messages += 1;
            }
            if self.prefix_seen > 0 {
                self.length[self.prefix_seen - 1] = data[0];
            }
            self.prefix_seen += 1;
            data = &data[1..];
            if self.prefix_seen == 5 {
                self.prefix_seen = 0;
                self.left = u64::from(u32::from_be_bytes(self.length));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MessageCount;

    /// `n` messages of `size` bytes each, as one byte string.
    fn messages(n: usize, size: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(0);
            out.extend_from_slice(&size.to_be_bytes());
            out.extend(std::iter::repeat_n(7, size as usize));
        }
        out
    }

    #[test]
    fn messages_are_counted_however_the_bytes_are_cut() {
        let bytes = messages(5, 300);
        for cut in [1, 2, 3, 5, 7, 300, 305, 1000, bytes.len()] {
            let mut count = MessageCount::default();
            for chunk in bytes.chunks(cut) {
                count.feed(chunk);
            }
            assert_eq!(count.messages, 5, "cut every {cut} bytes");
        }
        // Empty messages (a prefix alone) count too; a message cut off counts as started.
        let mut count = MessageCount::default();
        count.feed(&messages(3, 0));
        count.feed(&[0, 0, 0, 1]);
        assert_eq!(count.messages, 4);
    }
}
