//! Where a [`super::RedisTokenStore`] finds Redis: one server, a master behind Sentinel, or a
//! Cluster; and the two connections it keeps there (commands, and subscriptions).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, Pipeline, ProtocolVersion, PushInfo, RedisFuture, RedisResult, Value};

use super::redis::{MAX_REDIS_RETRY_BACKOFF, REDIS_CONNECT_TIMEOUT};

/// How a builder was told to reach Redis (URLs may hold passwords: never printed).
#[derive(Clone)]
pub(super) enum Target {
    Standalone(String),
    Sentinel {
        sentinels: Vec<String>,
        service: String,
        /// A URL whose username, password and database are the master's.
        master_settings: Option<String>,
    },
    Cluster(Vec<String>),
}

/// [`Target`], checked and ready to connect.
pub(super) enum Backend {
    Standalone(redis::Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster {
        commands: ClusterClient,
        nodes: Vec<String>,
    },
}

/// Calls the store's listeners with each push of a subscriber connection.
pub(super) type PushHandler = Arc<dyn Fn(PushInfo) + Send + Sync>;

impl Backend {
    /// Checks `target`; `Err` names what is wrong without repeating a URL.
    pub(super) fn new(target: Target, timeout: Duration) -> Result<Self, &'static str> {
        match target {
            Target::Standalone(url) => redis::Client::open(url.as_str())
                .map(Backend::Standalone)
                .map_err(|_| "the Redis URL cannot be parsed"),
            Target::Sentinel {
                sentinels,
                service,
                master_settings,
            } => {
                if sentinels.is_empty() || service.is_empty() {
                    return Err(
                        "a Sentinel setup needs at least one Sentinel URL and a service name",
                    );
                }
                let mut node = SentinelNodeConnectionInfo::default();
                if let Some(url) = master_settings {
                    let client = redis::Client::open(url.as_str())
                        .map_err(|_| "the Redis master settings URL cannot be parsed")?;
                    let settings = client.get_connection_info().redis_settings().clone();
                    node = node.set_redis_connection_info(settings);
                }
                SentinelClient::build(sentinels, service, Some(node), SentinelServerType::Master)
                    .map(|client| Backend::Sentinel(tokio::sync::Mutex::new(client)))
                    .map_err(|_| "a Redis Sentinel URL cannot be parsed")
            }
            Target::Cluster(nodes) => {
                if nodes.is_empty() {
                    return Err("a Redis Cluster setup needs at least one node URL");
                }
                cluster_builder(&nodes, timeout)
                    .build()
                    .map(|commands| Backend::Cluster { commands, nodes })
                    .map_err(|_| "a Redis Cluster node URL cannot be parsed")
            }
        }
    }

    /// `PUBLISH`, or `SPUBLISH` on a Cluster (sharded pub/sub: the message stays on the shard
    /// of the key's hash tag).
    pub(super) fn publish_command(&self) -> &'static str {
        match self {
            Backend::Cluster { .. } => "SPUBLISH",
            _ => "PUBLISH",
        }
    }

    /// Whether a failed operation should make the next one find the server again (Sentinel:
    /// the master may have changed).
    pub(super) fn rediscovers(&self) -> bool {
        matches!(self, Backend::Sentinel(_))
    }

    /// A client of the server to use (the current master, for Sentinel).
    async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Backend::Standalone(client) => Ok(client.clone()),
            Backend::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
            Backend::Cluster { .. } => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "a Redis Cluster has no single client",
            ))),
        }
    }

    /// A new command connection.
    pub(super) async fn connect(&self, timeout: Duration) -> RedisResult<Connection> {
        if let Backend::Cluster { commands, .. } = self {
            return commands
                .get_async_connection()
                .await
                .map(Connection::Cluster);
        }
        let client = self.client().await?;
        let config = manager_config(timeout);
        ConnectionManager::new_lazy_with_config(client, config).map(Connection::Single)
    }

    /// A new subscriber connection (RESP3, pushes to `handler`, resubscribing by itself after
    /// a reconnection).
    pub(super) async fn subscriber(
        &self,
        timeout: Duration,
        handler: PushHandler,
    ) -> RedisResult<Subscriber> {
        let push = move |push: PushInfo| {
            handler(push);
            Ok::<(), std::convert::Infallible>(())
        };
        if let Backend::Cluster { nodes, .. } = self {
            let client = cluster_builder(nodes, timeout)
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(push)
                .build()?;
            return client.get_async_connection().await.map(Subscriber::Cluster);
        }
        let info = self.client().await?.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let config = manager_config(timeout)
            .set_push_sender(push)
            .set_automatic_resubscription();
        ConnectionManager::new_lazy_with_config(client, config).map(Subscriber::Single)
    }
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(MAX_REDIS_RETRY_BACKOFF)
}

fn cluster_builder(nodes: &[String], timeout: Duration) -> ClusterClientBuilder {
    ClusterClientBuilder::new(nodes.iter().map(String::as_str))
        .connection_timeout(REDIS_CONNECT_TIMEOUT)
        .response_timeout(timeout)
        .retries(1)
}

/// The store's command connection: the connection manager of one server (standalone or the
/// Sentinel's master), or a Cluster connection. Both reconnect by themselves.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The store's subscriber connection.
#[derive(Clone)]
pub(super) enum Subscriber {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Subscriber {
    /// Subscribes to `channel`: `SUBSCRIBE`, or `SSUBSCRIBE` on a Cluster (one channel per
    /// command: channels of different keys live on different shards).
    pub(super) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Subscriber::Single(connection) => connection.subscribe(channel).await,
            Subscriber::Cluster(connection) => connection.ssubscribe(channel).await,
        }
    }

    /// Unsubscribes from `channel`: `UNSUBSCRIBE`, or `SUNSUBSCRIBE` on a Cluster.
    pub(super) async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Subscriber::Single(connection) => connection.unsubscribe(channel).await,
            Subscriber::Cluster(connection) => connection.sunsubscribe(channel).await,
        }
    }
}
