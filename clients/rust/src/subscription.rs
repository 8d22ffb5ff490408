//! The channels the application holds: where each one is, so a reconnect resumes it
//! with `since` and a repeated message is dropped.

use std::collections::HashMap;

use crate::event::Event;

#[derive(Debug, Default)]
struct Sub {
    /// The last offset delivered to the application, in `epoch`.
    offset: Option<u64>,
    epoch: Option<String>,
    /// `since` of the subscribe in flight (a resume), if any.
    resuming: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    subs: HashMap<String, Sub>,
}

impl Subscriptions {
    /// The application subscribes (`since`/`epoch` only when it knows them).
    pub(crate) fn add(&mut self, channel: &str, since: Option<u64>, epoch: Option<String>) {
        let sub = self.subs.entry(channel.to_owned()).or_default();
        if since.is_some() {
            sub.offset = since;
            sub.epoch = epoch;
        }
    }

    pub(crate) fn remove(&mut self, channel: &str) {
        self.subs.remove(channel);
    }

    /// The `since`/`epoch` to subscribe with now; marks the subscribe in flight.
    pub(crate) fn resume_point(&mut self, channel: &str) -> (Option<u64>, Option<String>) {
        match self.subs.get_mut(channel) {
            Some(sub) => {
                sub.resuming = sub.offset;
                (sub.offset, sub.epoch.clone())
            }
            None => (None, None),
        }
    }

    pub(crate) fn channels(&self) -> Vec<String> {
        self.subs.keys().cloned().collect()
    }

    /// A `message`: whether it is new (a replayed or repeated offset is not).
    pub(crate) fn message(&mut self, channel: &str, offset: u64) -> bool {
        match self.subs.get_mut(channel) {
            // Own `user:` channel and channels given up: nothing to order by.
            None => true,
            Some(sub) if sub.offset.is_some_and(|o| offset <= o) => false,
            Some(sub) => {
                sub.offset = Some(offset);
                true
            }
        }
    }

    /// A `subscribed` answering a subscribe: the event for the application.
    pub(crate) fn subscribed(
        &mut self,
        channel: &str,
        offset: u64,
        epoch: String,
        recovered: bool,
        read_offset: Option<u64>,
    ) -> Option<Event> {
        let sub = self.subs.get_mut(channel)?;
        let since = sub.resuming.take();
        if since.is_some() && !recovered {
            // The history no longer covers the gap: go on from where the channel is.
            sub.offset = Some(offset);
        } else {
            sub.offset = Some(sub.offset.map_or(offset, |o| o.max(offset)));
        }
        sub.epoch = Some(epoch.clone());
        Some(Event::Subscribed {
            channel: channel.to_owned(),
            offset,
            epoch,
            since,
            recovered,
            read_offset,
        })
    }

    /// The `subscribed` without `id` the server sends when the channel's offsets
    /// started over: the next message is offset 1 of the new epoch.
    pub(crate) fn restarted(&mut self, channel: &str, offset: u64, epoch: String) -> Option<Event> {
        let sub = self.subs.get_mut(channel)?;
        sub.offset = Some(offset);
        sub.epoch = Some(epoch.clone());
        Some(Event::Restarted {
            channel: channel.to_owned(),
            epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_drops_what_was_delivered_and_keeps_the_rest() {
        let mut s = Subscriptions::default();
        s.add("room:a", None, None);
        assert_eq!(s.resume_point("room:a"), (None, None));
        s.subscribed("room:a", 3, "e1".into(), false, None);
        assert!(s.message("room:a", 4));
        assert!(!s.message("room:a", 4));
        assert_eq!(s.resume_point("room:a"), (Some(4), Some("e1".into())));
        assert!(!s.message("room:a", 3));
        assert!(s.message("room:a", 5));
        let ev = s.subscribed("room:a", 5, "e1".into(), true, None);
        assert!(matches!(
            ev,
            Some(Event::Subscribed {
                since: Some(4),
                recovered: true,
                ..
            })
        ));
    }

    #[test]
    fn an_unrecoverable_resume_or_a_new_epoch_goes_on_from_the_channels_offset() {
        let mut s = Subscriptions::default();
        s.add("room:a", Some(10), Some("e1".into()));
        s.resume_point("room:a");
        let ev = s.subscribed("room:a", 2, "e2".into(), false, None);
        assert!(matches!(
            ev,
            Some(Event::Subscribed {
                since: Some(10),
                recovered: false,
                ..
            })
        ));
        assert!(s.message("room:a", 3));
        let ev = s.restarted("room:a", 0, "e3".into());
        assert!(matches!(ev, Some(Event::Restarted { .. })));
        assert!(s.message("room:a", 1), "the new count starts at 1");
    }
}
