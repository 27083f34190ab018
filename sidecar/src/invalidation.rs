//! Fleet-wide invalidation: every pod has its own sidecar, and a write reaches only one of them.
//! The app publishes the cache keys of each committed write on Redis `<prefix>:invalidate`; each
//! sidecar subscribes and purges the entries tagged with the object (`product:1002`), list pages
//! included, since the app tags a list with every product on it.
//!
//! Messages sent while the subscription is down are lost, so on every (re)subscription the sidecar
//! drops every entry it holds: it cannot prove them fresh (the app's own L1 does the same).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::state::Shared;

/// The tag a published key invalidates: `<prefix>:product:0:1002` -> `product:1002` (a key scoped
/// to a user, `<prefix>:order:7:42`, keeps its scope: `order:7:42`).
pub fn tag_of(prefix: &str, message: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?.strip_prefix(':')?;
    let mut parts = rest.split(':');
    let (category, scope, id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || category.is_empty() || scope.parse::<i64>().is_err() || id.parse::<i64>().is_err() {
        return None;
    }
    Some(if scope == "0" {
        format!("{category}:{id}")
    } else {
        format!("{category}:{scope}:{id}")
    })
}

pub struct Invalidations(pub Arc<Shared>);

#[async_trait]
impl BackgroundService for Invalidations {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let shared = &self.0;
        let Some(settings) = shared.live.load().config.cache.invalidation.clone() else {
            return;
        };
        let channel = format!("{}:invalidate", settings.prefix);
        let client = match redis::Client::open(settings.redis_url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cache.invalidation.redis_url: fleet invalidation is off");
                return;
            }
        };
        loop {
            let follow = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                let dropped = shared.store.purge_all();
                shared
                    .metrics
                    .cache_invalidations
                    .with_label_values(&["reconnect"])
                    .inc();
                shared
                    .metrics
                    .cache_invalidated_entries
                    .with_label_values(&["reconnect"])
                    .inc_by(dropped);
                tracing::info!(%channel, dropped, "following the app's cache invalidations");
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    if let Some(tag) = tag_of(&settings.prefix, &payload) {
                        shared.invalidate("fleet", [tag.as_str()]);
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                result = follow => match result {
                    Ok(()) => tracing::warn!(%channel, "cache invalidation channel lost; resubscribing"),
                    Err(e) => tracing::debug!(error = %e, "redis unavailable for cache invalidations"),
                },
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tag_of;

    #[test]
    fn published_keys_become_tags() {
        assert_eq!(tag_of("mall", "mall:product:0:1002").as_deref(), Some("product:1002"));
        assert_eq!(tag_of("mall", "mall:order:7:42").as_deref(), Some("order:7:42"));
        assert_eq!(tag_of("mall", "other:product:0:1"), None);
        assert_eq!(tag_of("mall", "mall:product:x:1"), None);
        assert_eq!(tag_of("mall", "mall:product:0:1:extra"), None);
    }
}
