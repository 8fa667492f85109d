//! The session book both job actors keep: one spawn-linked [`SessionActor`] per admitted worker,
//! which connection it serves, and the sends and closes that go through it. Which session is
//! current decides whether a worker's message or a session's end still counts.

use super::{AdmittedConnection, PeerMsg};
use crate::membership::SessionKey;
use crate::net::listener::refuse;
use crate::net::session::{CloseReason, SessionActor, SessionArgs, SessionMsg};
use eqim_common::proto::{CoordinatorToWorker, Refusal, WorkerId};
use ractor::{Actor, ActorId, ActorRef, Message, SupervisionEvent};
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::{debug, info, warn};

struct SessionEntry {
    key: SessionKey,
    actor: ActorRef<SessionMsg>,
}

/// A session that ended (its actor stopped or failed) while it was the worker's current one.
pub struct SessionEnd {
    pub worker: WorkerId,
    pub key: SessionKey,
    /// The session's stop reason, or its failure.
    pub why: String,
}

/// The job's sessions, by worker; at most one current session per worker.
pub struct Sessions {
    entries: BTreeMap<WorkerId, SessionEntry>,
    /// Which worker and connection each session actor serves, for supervision events.
    owners: BTreeMap<ActorId, (WorkerId, SessionKey)>,
    next_key: u64,
    /// Sent to each admitted worker, which heartbeats at this interval.
    heartbeat_interval: Duration,
}

impl Sessions {
    pub fn new(heartbeat_interval: Duration) -> Self {
        Self {
            entries: BTreeMap::new(),
            owners: BTreeMap::new(),
            next_key: 0,
            heartbeat_interval,
        }
    }

    /// A key no session of this job had before.
    pub fn next_key(&mut self) -> SessionKey {
        self.next_key += 1;
        SessionKey(self.next_key)
    }

    /// Spawns the session actor of an admitted connection (linked to `job`, so its end comes
    /// back as a supervision event) and makes it the worker's current session; false if it
    /// did not start.
    pub async fn start<M>(
        &mut self,
        job: &ActorRef<M>,
        key: SessionKey,
        c: AdmittedConnection,
    ) -> bool
    where
        M: Message + From<PeerMsg>,
        PeerMsg: TryFrom<M>,
    {
        let worker = c.hello.worker_id.clone();
        let args = SessionArgs {
            worker: worker.clone(),
            key,
            connection: c.connection,
            control_send: c.control_send,
            control_recv: c.control_recv,
            job: job.get_derived(),
            admitted: CoordinatorToWorker::Admitted {
                heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
            },
        };
        match Actor::spawn_linked(None, SessionActor, args, job.get_cell()).await {
            Ok((actor, _handle)) => {
                info!(worker_id = %worker, remote = %c.remote, device = %c.hello.device, "worker admitted");
                self.owners.insert(actor.get_id(), (worker.clone(), key));
                self.entries.insert(worker, SessionEntry { key, actor });
                true
            }
            Err(e) => {
                warn!(worker_id = %worker, cause = %e, "session did not start");
                false
            }
        }
    }

    /// Whether `key` is the worker's current session.
    pub fn is_current(&self, worker: &WorkerId, key: SessionKey) -> bool {
        self.entries.get(worker).is_some_and(|s| s.key == key)
    }

    pub fn contains(&self, worker: &WorkerId) -> bool {
        self.entries.contains_key(worker)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerId> {
        self.entries.keys()
    }

    /// Sends to the worker's current session, if it has one.
    pub fn send(&self, worker: &WorkerId, msg: CoordinatorToWorker) {
        if let Some(entry) = self.entries.get(worker) {
            if entry.actor.cast(SessionMsg::Send { msg }).is_err() {
                // Its end arrives as a supervision event and is handled there.
                debug!(worker_id = %worker, "session already stopped");
            }
        }
    }

    /// Closes the worker's session and keeps it current until its end is reported.
    pub fn close(&self, worker: &WorkerId, reason: CloseReason) {
        if let Some(entry) = self.entries.get(worker) {
            close_entry(entry, reason);
        }
    }

    /// Closes the worker's session and forgets it at once; true if it had one.
    pub fn remove(&mut self, worker: &WorkerId, reason: CloseReason) -> bool {
        match self.entries.remove(worker) {
            Some(entry) => {
                close_entry(&entry, reason);
                true
            }
            None => false,
        }
    }

    /// Closes every session.
    pub fn close_all(&self, reason: CloseReason) {
        for entry in self.entries.values() {
            close_entry(entry, reason.clone());
        }
    }

    /// Reads a supervision event: the end of a session that was still its worker's current
    /// one (which is then forgotten); `None` for other events and for replaced sessions.
    pub fn ended(&mut self, event: SupervisionEvent) -> Option<SessionEnd> {
        let (cell, why) = match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            _ => return None,
        };
        let (worker, key) = self.owners.remove(&cell.get_id())?;
        if !self.is_current(&worker, key) {
            return None;
        }
        self.entries.remove(&worker);
        Some(SessionEnd { worker, key, why })
    }
}

fn close_entry(entry: &SessionEntry, reason: CloseReason) {
    if entry.actor.cast(SessionMsg::Close { reason }).is_err() {
        debug!("session already stopped");
    }
}

/// Tells the client why it is not admitted and closes its connection, off the actor's thread.
pub fn refuse_later(mut c: AdmittedConnection, reason: Refusal) {
    tokio::spawn(async move {
        refuse(&c.connection, &mut c.control_send, reason).await;
    });
}
