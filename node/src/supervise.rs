//! Supervision of the node's long-lived tasks: the engine, the network
//! actor, the blob server, each folder worker and the API server.
//!
//! A panic in one of them used to leave a half-alive node: the others went
//! on and every request needing the dead one failed until a restart. Each
//! now runs under [`Supervisor::spawn`], which catches a panic at the
//! task's edge and fails the node: one `error!` line naming the task and
//! the panic message, an [`Event::NodeFailed`], and the failure recorded
//! for [`Node::failed`] and [`Node::wait_failed`]. Nothing restarts in the
//! process: what the panicking task held in memory is gone, so the process
//! ends (`shoal up` exits non-zero) and its service manager starts it again
//! from the durable state in the home. The first failure is the node's;
//! later ones are logged only.
//!
//! The panic is caught inside the task (not by a second task awaiting the
//! first), so the returned [`JoinHandle`] is the task's own: aborting it
//! drops the task's future, and awaiting it returns once that is done.
//!
//! Tests make a task panic with [`Supervisor::inject_fault`] (hidden):
//! each supervised task also waits on the fault channel, and panics when
//! its name is set there.
//!
//! [`Node::failed`]: crate::Node::failed
//! [`Node::wait_failed`]: crate::Node::wait_failed

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::error;

use crate::events::Event;

/// Why a node failed: which task panicked, and the panic's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The task: `engine`, `network`, `blob-server`, `folder-worker <space>`
    /// or `api`.
    pub actor: String,
    /// The panic message.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} panicked: {}", self.actor, self.message)
    }
}

/// Spawns the node's tasks and fails the node when one panics. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub(crate) struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    failed: watch::Sender<Option<Failure>>,
    events: broadcast::Sender<Event>,
    /// The task a test wants to panic (test-only fault injection).
    fault: watch::Sender<Option<String>>,
}

impl Supervisor {
    pub(crate) fn new(events: broadcast::Sender<Event>) -> Self {
        Self {
            inner: Arc::new(Inner {
                failed: watch::Sender::new(None),
                events,
                fault: watch::Sender::new(None),
            }),
        }
    }

    /// Spawns `task` as `actor`; a panic in it fails the node.
    pub(crate) fn spawn<F>(&self, actor: impl Into<String>, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let actor = actor.into();
        let this = self.clone();
        let mut fault = self.inner.fault.subscribe();
        tokio::spawn(async move {
            let name = actor.clone();
            let run = async move {
                tokio::select! {
                    biased;
                    () = task => {}
                    () = injected(&mut fault, &name) => {
                        panic!("injected fault (SHOAL_FAULT, tests only)")
                    }
                }
            };
            if let Err(payload) = AssertUnwindSafe(run).catch_unwind().await {
                this.fail(actor, panic_message(payload.as_ref()));
            }
        })
    }

    /// Records the node's failure (the first one only), logs it and tells
    /// the watchers.
    fn fail(&self, actor: String, message: String) {
        let failure = Failure { actor, message };
        error!(
            actor = %failure.actor,
            panic = %failure.message,
            "a node task panicked; the node has failed and must be restarted"
        );
        let first = self.inner.failed.send_if_modified(|f| {
            if f.is_some() {
                return false;
            }
            *f = Some(failure.clone());
            true
        });
        if first {
            let _ = self.inner.events.send(Event::NodeFailed {
                actor: failure.actor,
                error: failure.message,
            });
        }
    }

    /// The node's failure, if a task panicked.
    pub(crate) fn failed(&self) -> Option<Failure> {
        self.inner.failed.borrow().clone()
    }

    /// Waits until a task panics.
    pub(crate) async fn wait_failed(&self) -> Failure {
        let mut rx = self.inner.failed.subscribe();
        let seen = rx.wait_for(Option::is_some).await.map(|f| f.clone());
        match seen {
            Ok(Some(f)) => f,
            // The sender lives as long as `self`, and `wait_for` returns
            // only a value that is set: never reached.
            _ => std::future::pending().await,
        }
    }

    /// Makes the task named `actor` (or each `actor <detail>`, such as
    /// every `folder-worker`) panic. Tests only.
    pub(crate) fn inject_fault(&self, actor: &str) {
        self.inner.fault.send_replace(Some(actor.to_string()));
    }
}

/// Resolves when a test asks `name` to panic.
async fn injected(fault: &mut watch::Receiver<Option<String>>, name: &str) {
    let hit = |f: &Option<String>| {
        f.as_deref().is_some_and(|t| {
            name == t
                || name
                    .strip_prefix(t)
                    .is_some_and(|rest| rest.starts_with(' '))
        })
    };
    if fault.wait_for(hit).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}
