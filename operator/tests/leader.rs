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

/// On SIGTERM the leader deletes its Lease: a standby leads at its very next try, not after the
/// lease expires (17 s on a real cluster), and `helm uninstall` leaves no Lease behind.
#[tokio::test]
async fn a_released_lease_is_taken_at_once_and_leaves_nothing_behind() {
    let client = ClientBuilder::new().build().await.unwrap();
    let lease = Duration::from_secs(15);
    let a = Elector::new(client.clone(), "mall-system", "mall-operator-leader", "a", lease);
    let b = Elector::new(client.clone(), "mall-system", "mall-operator-leader", "b", lease);
    let t0 = Timestamp::from_second(1_800_000_000).unwrap();
    assert!(a.try_lead(t0).await.unwrap());
    assert!(!b.try_lead(t0).await.unwrap());
    assert!(!b.release().await.unwrap(), "a standby has nothing to release");
    assert!(a.release().await.unwrap(), "the leader releases");
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client.clone(), "mall-system");
    assert!(
        leases.get_opt("mall-operator-leader").await.unwrap().is_none(),
        "no Lease left behind"
    );
    // One second later, well inside the 15 s the lease had left.
    assert!(
        b.try_lead(t0 + SignedDuration::from_secs(1)).await.unwrap(),
        "the standby takes over at once"
    );
    assert!(
        !a.release().await.unwrap(),
        "the old leader does not delete the new leader's lease"
    );
    assert!(leases.get_opt("mall-operator-leader").await.unwrap().is_some());
}
