//! One pre-authorize call per client id at a time, whatever the number of requests that
//! miss the cache for it together.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OnceCell;

use crate::decision::preauth::{Answer, PreauthError};

type Shared = Result<Answer, Arc<PreauthError>>;

/// The pre-authorize calls in flight, one per client id: a miss joins the call in flight
/// for its client and shares its result, error included. Once a call has landed it is
/// forgotten, so the next miss calls again.
#[derive(Default)]
pub(super) struct Flights {
    pub(super) calls: Mutex<HashMap<String, Arc<OnceCell<Shared>>>>,
}

impl Flights {
    /// The result of the call for `client_id`: the one in flight, or `call` when there
    /// is none. If the request making the call goes away, a waiting one makes its own.
    pub(super) async fn join<F>(&self, client_id: &str, call: F) -> Shared
    where
        F: Future<Output = Result<Answer, PreauthError>>,
    {
        let flight = {
            let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
            let cell = calls.entry(client_id.to_owned()).or_default().clone();
            Flight {
                flights: self,
                client_id,
                cell,
            }
        };
        flight
            .cell
            .get_or_init(|| async { call.await.map_err(Arc::new) })
            .await
            .clone()
    }
}

/// One request's part in a call; forgets the call when it has landed, or when nobody
/// else waits for it.
struct Flight<'a> {
    flights: &'a Flights,
    client_id: &'a str,
    cell: Arc<OnceCell<Shared>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut calls = self
            .flights
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Clones are made under this lock, so the count cannot grow meanwhile: two means
        // the map's and ours.
        let done = self.cell.initialized() || Arc::strong_count(&self.cell) == 2;
        if done
            && calls
                .get(self.client_id)
                .is_some_and(|held| Arc::ptr_eq(held, &self.cell))
        {
            calls.remove(self.client_id);
        }
    }
}
