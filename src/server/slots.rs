//! Connection slots: at most `--max-connections` open at once, and at most
//! `--max-connections-per-peer` of them from one peer address, so that one
//! client holding connections open cannot lock every other client out.
//! A slot is given back when its [`Slot`] is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The open connections, in all and per peer address.
pub struct Slots {
    total: usize,
    per_peer: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `--max-connections` are open.
    Server,
    /// This peer already holds `--max-connections-per-peer`.
    Peer,
}

/// One open connection's slot.
pub struct Slot {
    slots: Arc<Slots>,
    peer: IpAddr,
}

impl Slots {
    pub fn new(total: usize, per_peer: usize) -> Arc<Slots> {
        Arc::new(Slots {
            total: total.max(1),
            per_peer: per_peer.clamp(1, total.max(1)),
            open: Mutex::new(Open::default()),
        })
    }

    /// Takes a slot for a connection from `peer`, if one is free for it.
    pub fn take(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Full> {
        let peer = peer.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.total {
            return Err(Full::Server);
        }
        let mine = open.by_peer.entry(peer).or_default();
        if *mine >= self.per_peer {
            return Err(Full::Peer);
        }
        *mine += 1;
        open.total += 1;
        Ok(Slot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total -= 1;
        if let Some(n) = open.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_cannot_take_every_slot() {
        let slots = Slots::new(4, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err(), Some(Full::Peer));
        // The same address written as IPv4-mapped IPv6 is the same peer.
        assert_eq!(
            slots.take("::ffff:127.0.0.1".parse().unwrap()).err(),
            Some(Full::Peer)
        );
        let _b1 = slots.take(b).unwrap();
        let _b2 = slots.take(b).unwrap();
        assert_eq!(
            slots.take("127.0.0.3".parse().unwrap()).err(),
            Some(Full::Server)
        );
        drop(a1);
        assert!(
            slots.take(a).is_ok(),
            "a closed connection gives its slot back"
        );
        assert!(slots.open.lock().unwrap().by_peer.len() <= 2);
    }
}
