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

/// On SIGTERM the leader releases its Lease: a standby leads at its very next try, not after the
/// lease expires (17 s on a real cluster). The Lease is kept with its `leaseTransitions`, the
/// history read when something flaps (issue 33: deleting it reset the count to 0).
#[tokio::test]
async fn a_released_lease_is_taken_at_once_and_keeps_its_history() {
    let client = ClientBuilder::new().build().await.unwrap();
    let lease = Duration::from_secs(15);
    let a = Elector::new(client.clone(), "mall-system", "mall-operator-leader", "a", lease);
    let b = Elector::new(client.clone(), "mall-system", "mall-operator-leader", "b", lease);
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client.clone(), "mall-system");
    let transitions = || async {
        leases
            .get("mall-operator-leader")
            .await
            .unwrap()
            .spec
            .unwrap()
            .lease_transitions
    };
    let t0 = Timestamp::from_second(1_800_000_000).unwrap();
    assert!(a.try_lead(t0).await.unwrap());
    assert!(!b.try_lead(t0).await.unwrap());
    // A handover by expiry, then one by release: two transitions.
    let t1 = t0 + SignedDuration::from_secs(16);
    assert!(b.try_lead(t1).await.unwrap());
    assert_eq!(transitions().await, Some(1));
    assert!(!a.release().await.unwrap(), "a standby has nothing to release");
    assert!(b.release().await.unwrap(), "the leader releases");
    assert_eq!(transitions().await, Some(1), "the history survives the release");
    // One second later, well inside the 15 s the lease had left.
    assert!(
        a.try_lead(t1 + SignedDuration::from_secs(1)).await.unwrap(),
        "the standby takes over at once"
    );
    assert_eq!(transitions().await, Some(2));
    assert!(
        !b.release().await.unwrap(),
        "the old leader does not release the new leader's lease"
    );
    let held = leases.get("mall-operator-leader").await.unwrap().spec.unwrap();
    assert_eq!(held.holder_identity.as_deref(), Some("a"));
}

/// The Lease is owned by the operator's Deployment, so `helm uninstall` (which deletes the
/// Deployment) leaves no Lease even when the RBAC is gone before the leader can release it
/// (issue 33: the release failed with 403 and the Lease stayed). A Lease written by an older
/// operator gets the owner at the next renewal. The garbage collector itself is not modelled.
#[tokio::test]
async fn the_lease_is_owned_by_the_operators_deployment() {
    use k8s_openapi::api::apps::v1::Deployment;
    let operator: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "mall-operator", "namespace": "mall-system" },
        "spec": { "selector": { "matchLabels": { "app": "x" } },
                  "template": { "metadata": { "labels": { "app": "x" } }, "spec": { "containers": [] } } }
    }))
    .unwrap();
    let client = ClientBuilder::new().with_object(operator).build().await.unwrap();
    let owner = mall_operator::leader::deployment_owner(&client, "mall-system", "mall-operator")
        .await
        .unwrap();
    assert!(!owner.uid.is_empty());
    let lease = Duration::from_secs(15);
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client.clone(), "mall-system");
    let owners = |name: &'static str| {
        let leases = leases.clone();
        async move {
            leases
                .get(name)
                .await
                .unwrap()
                .metadata
                .owner_references
                .unwrap_or_default()
        }
    };
    let t0 = Timestamp::from_second(1_800_000_000).unwrap();
    let a =
        Elector::new(client.clone(), "mall-system", "mall-operator-leader", "a", lease).with_owner(Some(owner.clone()));
    assert!(a.try_lead(t0).await.unwrap());
    assert_eq!(owners("mall-operator-leader").await, vec![owner.clone()]);

    let older = Elector::new(client.clone(), "mall-system", "legacy", "a", lease);
    assert!(older.try_lead(t0).await.unwrap());
    assert!(owners("legacy").await.is_empty());
    let newer = Elector::new(client.clone(), "mall-system", "legacy", "a", lease).with_owner(Some(owner.clone()));
    assert!(newer.try_lead(t0 + SignedDuration::from_secs(2)).await.unwrap());
    assert_eq!(owners("legacy").await, vec![owner]);
}

/// A standby knows who leads and says so in `/ready`, and is Ready while it can read the Lease:
/// readiness gates a rollout, and a surge pod that stays unready (it is a standby until the old
/// leader goes) held every upgrade (issue 33). A standby that cannot read the Lease is not Ready.
#[tokio::test]
async fn a_standby_is_ready_and_names_the_leader() {
    let client = ClientBuilder::new().build().await.unwrap();
    let lease = Duration::from_secs(15);
    let a = Elector::new(client.clone(), "mall-system", "mall-operator-leader", "a", lease);
    let b = Elector::new(client.clone(), "mall-system", "mall-operator-leader", "b", lease);
    let fresh = Duration::from_secs(10);
    let (ready, body) = b.standing().readiness("b", fresh);
    assert!(!ready, "not ready before it has read the Lease: {body}");
    let t0 = Timestamp::from_second(1_800_000_000).unwrap();
    assert!(a.try_lead(t0).await.unwrap());
    assert!(!b.try_lead(t0).await.unwrap());
    let (ready, body) = b.standing().readiness("b", fresh);
    assert!(ready, "{body}");
    assert!(body.starts_with("standby") && body.contains("a leads"), "{body}");
    let (ready, body) = a.standing().readiness("a", fresh);
    assert!(ready && body.starts_with("leader"), "{body}");
}
