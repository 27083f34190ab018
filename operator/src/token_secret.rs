//! The token-signing Secret `<name>-jwt` of a mall whose `spec.auth.jwtSecret` names none: 48
//! random bytes (key `secret`), created whenever it is missing and never changed (a new key would
//! log every user out), owned by the MallDeployment so deleted with it. The operator sees these
//! Secrets through a label-selected *metadata* watch: it knows which exist and who owns them, and
//! never reads a key.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::ResourceExt;

use crate::apply::{api_message, ChildResult, Failed, Outcome};
use crate::context::{Context, Stores, MANAGER};
use crate::crd::MallDeployment;
use crate::desired;

/// Creates the Secret when the cache has none of that name; leaves an existing one alone. One
/// still owned by a deleted MallDeployment of the same name (the garbage collector has not
/// removed it yet) is reported as not applied: the pods would read the old key, and the
/// collector is about to delete it. Its deletion reconciles this mall (same name), which then
/// creates its own.
pub(crate) async fn ensure(ctx: &Context, md: &MallDeployment, ns: &str, outcome: &mut Outcome) -> ChildResult {
    let name = desired::generated_jwt_secret_name(md);
    let child = format!("Secret/{name}");
    if let Some(live) = Stores::get(&ctx.stores.secrets, ns, &name) {
        let uid = md.uid();
        let mut owners = live
            .owner_references()
            .iter()
            .filter(|o| o.kind == "MallDeployment")
            .peekable();
        let ours = uid.is_none() || owners.peek().is_none() || owners.any(|o| Some(&o.uid) == uid.as_ref());
        if ours {
            return ChildResult::Ok;
        }
        return ChildResult::Failed(Failed {
            child,
            message: "still owned by a deleted MallDeployment of the same name: created for this one once the garbage collector has removed it".into(),
        });
    }
    let mut key = [0u8; 48];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key)) {
        return ChildResult::Failed(Failed {
            child,
            message: format!("no random bytes for the token key: {e}"),
        });
    }
    let secret = Secret {
        metadata: desired::meta(md, name.clone()),
        type_: Some("Opaque".into()),
        data: Some(std::collections::BTreeMap::from([(
            "secret".to_string(),
            k8s_openapi::ByteString(key.to_vec()),
        )])),
        ..Default::default()
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    match api.create(&params, &secret).await {
        Ok(_) => {
            outcome.applied.push(child);
            ChildResult::Ok
        }
        // Created by the previous pass and not in the cache yet, or a Secret of that name without
        // the operator's labels (the pods then use it): either way, left as it is.
        Err(kube::Error::Api(e)) if e.code == 409 => ChildResult::Ok,
        Err(e) => ChildResult::Failed(Failed {
            child,
            message: api_message(&e),
        }),
    }
}
