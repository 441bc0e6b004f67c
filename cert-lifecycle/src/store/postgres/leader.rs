//! One node at a time: a PostgreSQL session advisory lock, held on a connection of its own for
//! as long as the node lives.
//!
//! The lock belongs to the connection, so it is released when the connection ends: at once when
//! the node's process dies (its kernel closes the socket, SIGKILL included) or the server
//! restarts, and after the server notices a dead peer when the network between them fails
//! (TCP keepalive; the server's `tcp_keepalives_*` settings bound it). A leader checks its
//! connection at every [`Leadership::hold`], so a node that lost the lock learns it at its next
//! tick and stops acting as the leader.
//!
//! Nothing the leader does relies on being alone for correctness: every change is a
//! conditional transition in the store. The lock only keeps the nodes from repeating each
//! other's work.

use tokio_postgres::{Client, NoTls};

use super::{PgStore, WAIT, pg_error};
use crate::StoreError;
use crate::error::DatabaseError;

/// A node's claim to a role that one node at a time plays (the sweeps, the checkpoints).
pub struct Leadership {
    store: PgStore,
    role: String,
    /// The connection that holds the lock, or that will try again; `None` after a failure.
    client: Option<Client>,
    held: bool,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("role", &self.role)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// A claim to `role`, not yet tried. Roles are scoped to the database and its schema.
    pub fn leadership(&self, role: &str) -> Leadership {
        Leadership {
            store: self.clone(),
            role: role.to_owned(),
            client: None,
            held: false,
        }
    }
}

impl Leadership {
    /// Whether this node holds the role now: takes it when no live node holds it, and checks
    /// that a lock held before is still held (its connection alive). Fails with
    /// `Unavailable` when the database cannot be reached, and the role is then not held.
    pub fn hold(&mut self) -> Result<bool, StoreError> {
        let store = self.store.clone();
        // A half-open connection (the server or the network gone without a word) would hold
        // the caller forever: past the store's wait, the connection is dropped and the role
        // counts as lost.
        let result = store.run(async {
            tokio::time::timeout(WAIT, self.try_hold(&store))
                .await
                .unwrap_or(Err(StoreError::Unavailable(DatabaseError::Timeout(WAIT))))
        });
        match result {
            Ok(held) => {
                self.held = held;
                Ok(held)
            }
            Err(error) => {
                self.client = None;
                self.held = false;
                Err(error)
            }
        }
    }

    async fn try_hold(&mut self, store: &PgStore) -> Result<bool, StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.held = false;
            let (client, connection) = store.inner.config.connect(NoTls).await.map_err(pg_error)?;
            // It ends with an error when the server goes away; the next `hold` sees the
            // client closed and connects again.
            store.inner.handle.spawn(async move {
                let _ = connection.await;
            });
            self.client = Some(client);
        }
        let Some(client) = self.client.as_ref() else {
            return Ok(false);
        };
        // Session locks stack: taking it again while held only counts up, which is fine,
        // as it is never released but with the connection.
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('smartsign.' || $1::text || '.' || \
                 current_schema())::bigint)",
                &[&self.role],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.get::<_, bool>(0))
    }

    /// Whether the last [`Leadership::hold`] found the role held.
    pub fn held(&self) -> bool {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::tests::fresh;

    #[test]
    fn one_node_at_a_time_holds_a_role_and_another_takes_it_over() {
        let Some((_schema, store)) = fresh() else {
            return;
        };
        // Each claim has a connection of its own: as good as another node.
        let mut first = store.leadership("sweeps");
        let mut second = store.leadership("sweeps");
        let mut other_role = store.leadership("checkpoints");
        assert!(first.hold().unwrap());
        assert!(!second.hold().unwrap());
        assert!(other_role.hold().unwrap());
        assert!(first.hold().unwrap(), "held again at the next tick");
        assert!(!second.hold().unwrap());

        // Another database schema (another deployment) has roles of its own.
        let Some((_elsewhere, other_store)) = fresh() else {
            return;
        };
        assert!(other_store.leadership("sweeps").hold().unwrap());

        // The leader's connection ends (its node died): the role is free for the next tick.
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !second.hold().unwrap() {
            assert!(Instant::now() < deadline, "the role was not released");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(second.held());
    }
}
