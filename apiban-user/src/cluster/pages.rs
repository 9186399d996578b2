//! Reading a key range in pages, so that no answer comes near etcd's 1.5 MiB response limit
//! and no read of a million keys holds them all in one message.

use etcd_client::{Client, GetOptions, KeyValue};

use super::{CallError, within};

/// One key range, read a page at a time.
pub struct Pages {
    next: Option<Vec<u8>>,
    end: Vec<u8>,
    /// Every page at this revision (one consistent view), or each at the newest.
    revision: Option<i64>,
    limit: i64,
    what: &'static str,
}

impl Pages {
    /// Every key that starts with `prefix`, `limit` keys a page.
    pub fn under(prefix: &str, limit: i64, what: &'static str) -> Self {
        Self {
            next: Some(prefix.as_bytes().to_vec()),
            end: prefix_end(prefix),
            revision: None,
            limit,
            what,
        }
    }

    pub fn at_revision(mut self, revision: i64) -> Self {
        self.revision = Some(revision);
        self
    }

    /// The next page; None once the range is read.
    pub async fn next(&mut self, client: &mut Client) -> Result<Option<Vec<KeyValue>>, CallError> {
        let Some(start) = self.next.take() else {
            return Ok(None);
        };
        let mut options = GetOptions::new()
            .with_range(self.end.clone())
            .with_limit(self.limit);
        if let Some(revision) = self.revision {
            options = options.with_revision(revision);
        }
        let mut page = within(self.what, client.get(start, Some(options))).await?;
        let more = page.more();
        let kvs = page.take_kvs();
        if more && let Some(last) = kvs.last() {
            let mut after = last.key().to_vec();
            after.push(0);
            self.next = Some(after);
        }
        Ok((!kvs.is_empty()).then_some(kvs))
    }
}

/// The key right after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end("/apiban/v1/"), b"/apiban/v10".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
