//! Lease-based leader election against the in-memory API (`kube-fake-client`).

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube_fake_client::ClientBuilder;
use mall_operator::leader::Elector;

#[tokio::test]
async fn one_leader_at_a_time_and_takeover_after_expiry() {
    let client = ClientBuilder::new().build().await.unwrap();
    let lease = Duration::from_secs(15);
    let a = Elector::new(client.clone(), "mall-system", "mall-operator-leader", "a", lease);
    let b = Elector::new(client.clone(), "mall-system", "mall-operator-leader", "b", lease);
    let t0 = Timestamp::from_second(1_800_000_000).unwrap();

    assert!(
        a.try_lead(t0).await.unwrap(),
        "the first candidate takes the free lease"
    );
    assert!(!b.try_lead(t0).await.unwrap(), "the second waits");
    let later = t0 + SignedDuration::from_secs(10);
    assert!(a.try_lead(later).await.unwrap(), "the holder renews");
    assert!(
        !b.try_lead(later + SignedDuration::from_secs(10)).await.unwrap(),
        "renewed: still not expired"
    );
    // The holder stops renewing: after the lease duration the other takes over.
    let expired = later + SignedDuration::from_secs(16);
    assert!(b.try_lead(expired).await.unwrap());
    assert!(!a.try_lead(expired).await.unwrap(), "the old holder has lost it");
}
