//! Users' teams and tasks as the gateway gets them: asked of a worker over the bus
//! (workers call the team backend and cache the answer), the cached copy marked
//! `degraded` when no worker answers, concurrent asks for one user shared, and the
//! queue of users whose context is to be fetched again.

use std::time::Duration;

use shared::bus::SharedBus;
use shared::protocol::{UserContext, UserContextRequest};
use shared::store::SharedStore;
use shared::subjects::Subjects;

/// The user-context service of a node.
pub struct Contexts {
    bus: SharedBus,
    store: SharedStore,
    subjects: Subjects,
    /// How long a worker has to answer (`SB_USER_CONTEXT_TIMEOUT_MS`).
    timeout: Duration,
    /// Whether the user's token goes with the request (`SB_FORWARD_USER_TOKEN`).
    forward_token: bool,
    /// Fetches in flight, by (user, fresh): concurrent connects and refreshes of one
    /// user on this node share one request.
    flights: shared::coalesce::Coalescer<(String, bool), UserContext>,
    /// Users whose context is to be fetched again for their live connections.
    pub refresher: crate::refresher::Refresher,
}

impl Contexts {
    pub fn new(
        bus: SharedBus,
        store: SharedStore,
        subjects: Subjects,
        timeout: Duration,
        forward_token: bool,
    ) -> Contexts {
        Contexts {
            bus,
            store,
            subjects,
            timeout,
            forward_token,
            flights: Default::default(),
            refresher: Default::default(),
        }
    }

    /// Teams and tasks from a worker over NATS; on timeout or no responders, the last
    /// cached context (or nothing), marked degraded. Concurrent calls for the same
    /// user (and `fresh`) share one request. `fresh` asks the worker to call the team
    /// backend even when it holds a recent answer.
    pub async fn get(&self, user_id: &str, token: &str, fresh: bool) -> UserContext {
        self.flights
            .run((user_id.to_owned(), fresh), || {
                self.fetch(user_id, token, fresh)
            })
            .await
    }

    async fn fetch(&self, user_id: &str, token: &str, fresh: bool) -> UserContext {
        let timeout = self.timeout;
        if self.bus.connected() {
            let body = serde_json::to_vec(&UserContextRequest {
                user_id: user_id.to_owned(),
                token: self.forward_token.then(|| token.to_owned()),
                fresh,
            })
            .unwrap_or_default();
            let reply = self
                .bus
                .request(self.subjects.user_context_rpc(), body.into(), timeout)
                .await;
            match reply {
                Ok(msg) => match serde_json::from_slice::<UserContext>(&msg.payload) {
                    Ok(ctx) => return ctx,
                    Err(e) => tracing::warn!(error = %e, "malformed user context reply"),
                },
                Err(e) => {
                    metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "user_context")
                        .increment(1);
                    tracing::debug!(error = %e, "user context request failed");
                }
            }
        }
        let cached = match self.store.cached_context(user_id).await {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "cached_context")
                    .increment(1);
                tracing::debug!(error = %e, "cached context unavailable");
                None
            }
        };
        UserContext {
            degraded: true,
            ..cached.unwrap_or_default()
        }
    }
}
