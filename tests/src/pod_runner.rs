//! A stand-in for the kubelet: runs the pod templates `operator render` prints as containers on
//! the machine's Docker Engine, the way a kubelet would run them.
//!
//! What it does, per pod:
//! - one network namespace, held by an infra container (`pod-pause`, as the kubelet's pause
//!   container), joined by every container of the pod, with the pod's own IP on a Docker bridge
//!   network;
//! - each container from its image with the rendered args, env (`value`, `secretKeyRef` from the
//!   Secrets given to the runner, `fieldRef` to `status.podIP` and `metadata.name`, `$(VAR)`
//!   expanded as the kubelet expands it) and ports;
//! - the security context: runAsUser/runAsGroup (`--user`), fsGroup (volumes owned by it and the
//!   group added), `capabilities.drop: [ALL]` (`--cap-drop ALL`), `allowPrivilegeEscalation: false`
//!   (`no-new-privileges`), the RuntimeDefault seccomp profile (Docker's default profile),
//!   `readOnlyRootFilesystem` (`--read-only`);
//! - `resources.limits` as the cgroup's CPU quota and memory limit (`--cpus`, `--memory`, swap
//!   off);
//! - ConfigMap volumes as read-only files, emptyDir volumes as directories that outlive container
//!   restarts (as an emptyDir outlives them);
//! - HTTP liveness and readiness probes at their period, timeout and failure threshold: a failed
//!   liveness probe restarts the container (with its grace period), readiness decides whether the
//!   pod is behind the Service;
//! - deletion: SIGTERM, then SIGKILL after `terminationGracePeriodSeconds`.
//!
//! A [`Service`] is a round-robin TCP proxy on 127.0.0.1 over the ready pods' target port.
//!
//! Not modelled: scheduling, init containers, startup probes, exec and TCP probes, pod restart
//! backoff (a failed container is restarted at once), projected/secret volumes, DNS (pods reach
//! each other by IP; the headless `<name>-app` Service the sidecar resolves is given as
//! `/etc/hosts` entries), image pulls (images must be in the engine), ConfigMap updates after
//! start (a test delivers one with [`Pod::update_config_map_file`]), and the memory accounting
//! of tmpfs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// Runs `docker` and returns its stdout, or an error with its stderr.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether a Docker Engine answers; under `CI=true` its absence fails with how to get one.
pub fn engine_available() -> bool {
    if docker(&["info", "--format", "{{.ServerVersion}}"]).is_ok() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("no Docker Engine answers: install and start one (apt-get install docker.io && dockerd &), then run scripts/images.sh");
    }
    eprintln!("SKIPPED: no Docker Engine (under CI=true this fails)");
    false
}

/// The image the infra container runs (`scripts/images.sh` builds it).
pub const INFRA_IMAGE: &str = "mall-pod-infra:local";

/// One container of a running pod.
#[derive(Debug)]
pub struct RunningContainer {
    pub name: String,
    /// The Docker container's name.
    pub id: String,
    pub grace: u64,
}

/// A running pod.
pub struct Pod {
    pub name: String,
    pub ip: String,
    infra: String,
    pub containers: Vec<RunningContainer>,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Liveness restarts, by container name.
    pub restarts: Arc<Mutex<BTreeMap<String, u32>>>,
    deleted: AtomicBool,
    _volumes: tempfile::TempDir,
}

impl Drop for Pod {
    /// A pod a failed test did not delete is removed at once (no grace), so no container
    /// outlives its test.
    fn drop(&mut self) {
        if !self.deleted.load(Ordering::SeqCst) {
            self.stop.store(true, Ordering::SeqCst);
            for c in &self.containers {
                let _ = docker(&["rm", "-f", &c.id]);
            }
            let _ = docker(&["rm", "-f", &self.infra]);
        }
    }
}

impl Pod {
    /// A ConfigMap's new contents reach the pod as the kubelet's sync delivers them: the file in
    /// the mounted volume `volume` is replaced (the programs read it again; the sidecar checks
    /// every 2 s).
    pub fn update_config_map_file(&self, volume: &str, key: &str, text: &str) -> Result<(), String> {
        let path = self._volumes.path().join(volume).join(key);
        if !path.exists() {
            return Err(format!("{}: no file {key} in volume {volume}", self.name));
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The container's log (stdout and stderr).
    pub fn logs(&self, container: &str) -> String {
        let Some(c) = self.containers.iter().find(|c| c.name == container) else {
            return String::new();
        };
        let out = std::process::Command::new("docker").args(["logs", &c.id]).output();
        out.map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
    }

    /// `docker inspect` of one container.
    pub fn inspect(&self, container: &str) -> Value {
        let c = self.containers.iter().find(|c| c.name == container).expect("container");
        let text = docker(&["inspect", &c.id]).expect("inspect");
        serde_json::from_str::<Value>(&text).expect("inspect json")[0].clone()
    }

    /// Deletes the pod as the kubelet does: SIGTERM to every container, SIGKILL after its grace
    /// period, then the infra container.
    pub fn delete(&self) {
        self.deleted.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
        let handles: Vec<_> = self
            .containers
            .iter()
            .map(|c| {
                let (id, grace) = (c.id.clone(), c.grace.to_string());
                std::thread::spawn(move || {
                    let _ = docker(&["stop", "-t", &grace, &id]);
                })
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        for c in &self.containers {
            let _ = docker(&["rm", "-f", &c.id]);
        }
        let _ = docker(&["rm", "-f", &self.infra]);
    }
}

/// What the runner needs besides the pod template.
#[derive(Default, Clone)]
pub struct Cluster {
    /// Secrets by name, then key.
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    /// ConfigMaps by name, then key (from the rendered objects).
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// Mounted as every container's `/etc/hosts`: a headless Service's name standing for its
    /// ready pods' IPs (see [`write_hosts`]), where the cluster would have DNS.
    pub hosts_file: Option<PathBuf>,
}

impl Cluster {
    /// The ConfigMaps of a rendered stream.
    pub fn from_rendered(rendered: &str) -> Cluster {
        let mut c = Cluster::default();
        for object in objects(rendered) {
            if object["kind"] == "ConfigMap" {
                let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
                let data = object["data"]
                    .as_object()
                    .map(|d| {
                        d.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                c.config_maps.insert(name, data);
            }
        }
        c
    }
}

/// Every object of a rendered YAML stream.
pub fn objects(rendered: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        if !v.is_null() {
            out.push(serde_json::to_value(v).expect("json"));
        }
    }
    out
}

/// A Docker network standing for the cluster's pod network.
pub struct Network {
    pub name: String,
}

impl Network {
    pub fn create(name: &str) -> Network {
        let _ = docker(&["network", "rm", name]);
        docker(&["network", "create", name]).expect("docker network create");
        Network { name: name.into() }
    }
}

impl Network {
    /// The host's address on this network (its gateway).
    pub fn gateway(&self) -> String {
        docker(&[
            "network",
            "inspect",
            &self.name,
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
        ])
        .expect("gateway")
    }

    /// Makes a service listening on the host's loopback (PostgreSQL, Redis) reachable from the
    /// pods: a TCP forwarder on the host's address on this network. Returns `host:port` for the
    /// pods to use.
    pub async fn forward_host_port(&self, port: u16) -> (String, tokio::task::JoinHandle<()>) {
        let gateway = self.gateway();
        let listener = tokio::net::TcpListener::bind((gateway.as_str(), 0))
            .await
            .expect("bind on the gateway");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        (addr.to_string(), task)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// `500m` -> "0.5", `2` -> "2".
fn cpus(q: &str) -> Option<String> {
    let millis = match q.strip_suffix('m') {
        Some(m) => m.parse::<f64>().ok()?,
        None => q.parse::<f64>().ok()? * 1000.0,
    };
    Some(format!("{}", millis / 1000.0))
}

/// `512Mi` -> bytes.
fn bytes(q: &str) -> Option<u64> {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return Some((n.parse::<f64>().ok()? * factor as f64) as u64);
        }
    }
    q.parse().ok()
}

/// The kubelet's `$(VAR)` expansion: a reference to an earlier variable is replaced, `$$` is `$`.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after
            .strip_prefix('(')
            .and_then(|a| a.find(')').map(|end| (&a[..end], &a[end + 1..])))
        {
            match env.iter().rev().find(|(k, _)| k == inner.0) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(inner.0);
                    out.push(')');
                }
            }
            rest = inner.1;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Starts one replica of `template` (a Deployment's `spec.template`) as pod `pod_name`.
pub async fn start_pod(network: &Network, cluster: &Cluster, template: &Value, pod_name: &str) -> Result<Pod, String> {
    let spec = &template["spec"];
    let pod_sc = &spec["securityContext"];
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let fs_group = pod_sc["fsGroup"].as_u64();
    let volumes_dir = tempfile::Builder::new()
        .prefix("mall-pod-")
        .tempdir_in("/var/tmp")
        .map_err(|e| e.to_string())?;

    // Volumes: ConfigMaps as files, emptyDirs as directories, owned by fsGroup.
    let mut volume_paths: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let dir = volumes_dir.path().join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        if let Some(cm) = v["configMap"]["name"].as_str() {
            let data = cluster
                .config_maps
                .get(cm)
                .ok_or_else(|| format!("volume {name}: ConfigMap {cm} not found"))?;
            for (k, val) in data {
                std::fs::write(dir.join(k), val).map_err(|e| e.to_string())?;
            }
            volume_paths.insert(name, (dir, true));
        } else if v.get("emptyDir").is_some() {
            volume_paths.insert(name, (dir, false));
        } else {
            return Err(format!("volume {name}: only configMap and emptyDir are modelled"));
        }
    }
    let group = fs_group.unwrap_or(0);
    let _ = std::process::Command::new("chown")
        .args(["-R", &format!("0:{group}"), &volumes_dir.path().display().to_string()])
        .status();
    let _ = std::process::Command::new("chmod")
        .args(["-R", "g+rwX,o+rX", &volumes_dir.path().display().to_string()])
        .status();
    let _ = std::process::Command::new("chmod")
        .args(["o+x", &volumes_dir.path().display().to_string()])
        .status();

    let infra = format!("{pod_name}-infra");
    let _ = docker(&["rm", "-f", &infra]);
    let mut args = vec![
        "run".to_string(),
        "-d".into(),
        "--name".into(),
        infra.clone(),
        "--network".into(),
        network.name.clone(),
        "--user".into(),
        "65535:65535".into(),
        "--cap-drop".into(),
        "ALL".into(),
        "--read-only".into(),
    ];
    args.push(INFRA_IMAGE.into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&argv)?;
    let ip = docker(&[
        "inspect",
        "-f",
        &format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            network.name
        ),
        &infra,
    ])?;

    let ready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let restarts = Arc::new(Mutex::new(BTreeMap::new()));
    let mut containers = Vec::new();
    let mut readiness: Vec<Arc<AtomicBool>> = Vec::new();
    for c in spec["containers"].as_array().into_iter().flatten() {
        let cname = c["name"].as_str().unwrap_or_default().to_string();
        let id = format!("{pod_name}-{cname}");
        let _ = docker(&["rm", "-f", &id]);
        let sc = &c["securityContext"];
        let user = sc["runAsUser"].as_u64().or(pod_sc["runAsUser"].as_u64());
        let group_id = sc["runAsGroup"].as_u64().or(pod_sc["runAsGroup"].as_u64());
        let mut a: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            id.clone(),
            "--network".into(),
            format!("container:{infra}"),
        ];
        if let Some(u) = user {
            a.push("--user".into());
            a.push(match group_id {
                Some(g) => format!("{u}:{g}"),
                None => u.to_string(),
            });
        }
        if let Some(g) = fs_group {
            a.push("--group-add".into());
            a.push(g.to_string());
        }
        let drops: Vec<&str> = sc["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for d in drops {
            a.push("--cap-drop".into());
            a.push(d.into());
        }
        if sc["allowPrivilegeEscalation"] == Value::Bool(false) {
            a.push("--security-opt".into());
            a.push("no-new-privileges".into());
        }
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or(pod_sc["seccompProfile"]["type"].as_str())
            .unwrap_or("Unconfined");
        if seccomp != "RuntimeDefault" {
            a.push("--security-opt".into());
            a.push("seccomp=unconfined".into());
        }
        if sc["readOnlyRootFilesystem"] == Value::Bool(true) {
            a.push("--read-only".into());
        }
        let limits = &c["resources"]["limits"];
        if let Some(cpu) = limits["cpu"].as_str().and_then(cpus) {
            a.push("--cpus".into());
            a.push(cpu);
        }
        if let Some(mem) = limits["memory"].as_str().and_then(bytes) {
            a.push("--memory".into());
            a.push(mem.to_string());
            a.push("--memory-swap".into());
            a.push(mem.to_string());
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap_or_default();
            let (dir, config) = volume_paths
                .get(vname)
                .ok_or_else(|| format!("{cname}: volume {vname} not declared"))?;
            let ro = *config || m["readOnly"] == Value::Bool(true);
            a.push("-v".into());
            a.push(format!(
                "{}:{}{}",
                dir.display(),
                m["mountPath"].as_str().unwrap_or_default(),
                if ro { ":ro" } else { "" }
            ));
        }
        if let Some(hosts) = &cluster.hosts_file {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(hosts, std::fs::Permissions::from_mode(0o644));
            a.push("-v".into());
            a.push(format!("{}:/etc/hosts:ro", hosts.display()));
        }
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let k = e["name"].as_str().unwrap_or_default().to_string();
            let v = if let Some(v) = e["value"].as_str() {
                expand(v, &env)
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                let (s, key) = (
                    r["name"].as_str().unwrap_or_default(),
                    r["key"].as_str().unwrap_or_default(),
                );
                match cluster.secrets.get(s).and_then(|d| d.get(key)) {
                    Some(v) => v.clone(),
                    None if r.get("optional") == Some(&Value::Bool(true)) => continue,
                    None => {
                        return Err(format!(
                            "{cname}: env {k}: Secret {s} key {key} not found (CreateContainerConfigError)"
                        ))
                    }
                }
            } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                // The downward API, for the fields the rendered pods use.
                match field {
                    "status.podIP" => ip.trim().to_string(),
                    "metadata.name" => pod_name.to_string(),
                    other => return Err(format!("{cname}: env {k}: fieldRef {other} is not modelled")),
                }
            } else {
                continue;
            };
            env.push((k, v));
        }
        for (k, v) in &env {
            a.push("-e".into());
            a.push(format!("{k}={v}"));
        }
        a.push(c["image"].as_str().unwrap_or_default().to_string());
        for arg in c["args"].as_array().into_iter().flatten() {
            a.push(expand(arg.as_str().unwrap_or_default(), &env));
        }
        let argv: Vec<&str> = a.iter().map(String::as_str).collect();
        if let Err(e) = docker(&argv) {
            // A container that cannot be created (an image the engine does not have: no registry
            // answers here) leaves no part of the pod behind.
            stop.store(true, Ordering::SeqCst);
            for started in containers
                .iter()
                .map(|c: &RunningContainer| c.id.as_str())
                .chain([id.as_str(), infra.as_str()])
            {
                let _ = docker(&["rm", "-f", started]);
            }
            return Err(format!("container {cname}: {e}"));
        }
        // Probes.
        let container_ready = Arc::new(AtomicBool::new(c.get("readinessProbe").is_none()));
        readiness.push(container_ready.clone());
        for (kind, probe) in [("liveness", &c["livenessProbe"]), ("readiness", &c["readinessProbe"])] {
            let Some(get) = probe["httpGet"].as_object() else {
                continue;
            };
            let port = port_number(&get["port"], c);
            let url = format!("http://{ip}:{port}{}", get["path"].as_str().unwrap_or("/"));
            let period = probe["periodSeconds"].as_u64().unwrap_or(10);
            let timeout = probe["timeoutSeconds"].as_u64().unwrap_or(1);
            let threshold = probe["failureThreshold"].as_u64().unwrap_or(3) as u32;
            let initial = probe["initialDelaySeconds"].as_u64().unwrap_or(0);
            let (stop, flag, restarts, id, cname) = (
                stop.clone(),
                container_ready.clone(),
                restarts.clone(),
                id.clone(),
                cname.clone(),
            );
            let liveness = kind == "liveness";
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(timeout))
                    .build()
                    .expect("client");
                tokio::time::sleep(Duration::from_secs(initial)).await;
                let mut failures = 0u32;
                // Readiness is tried every 200 ms until the first success, then at its period,
                // so tests do not wait a period for a pod that is already up.
                let mut first = true;
                while !stop.load(Ordering::SeqCst) {
                    let ok = client.get(&url).send().await.is_ok_and(|r| r.status().is_success());
                    if ok {
                        failures = 0;
                        if !liveness {
                            flag.store(true, Ordering::SeqCst);
                            first = false;
                        }
                    } else {
                        failures += 1;
                        if !liveness && (failures >= threshold || first) {
                            flag.store(false, Ordering::SeqCst);
                        }
                        if liveness && failures >= threshold {
                            *restarts.lock().unwrap().entry(cname.clone()).or_insert(0) += 1;
                            let id = id.clone();
                            let grace = grace.to_string();
                            let _ = tokio::task::spawn_blocking(move || docker(&["restart", "-t", &grace, &id])).await;
                            failures = 0;
                        }
                    }
                    let wait = if !liveness && first {
                        Duration::from_millis(200)
                    } else {
                        Duration::from_secs(period)
                    };
                    tokio::time::sleep(wait).await;
                }
            });
        }
        containers.push(RunningContainer { name: cname, id, grace });
    }
    // The pod is ready when every container is.
    let (pod_ready, stop2) = (ready.clone(), stop.clone());
    tokio::spawn(async move {
        while !stop2.load(Ordering::SeqCst) {
            pod_ready.store(readiness.iter().all(|r| r.load(Ordering::SeqCst)), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok(Pod {
        name: pod_name.into(),
        ip,
        infra,
        containers,
        ready,
        stop,
        restarts,
        deleted: AtomicBool::new(false),
        _volumes: volumes_dir,
    })
}

fn port_number(port: &Value, container: &Value) -> u64 {
    match port {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(name) => container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or(0),
        _ => 0,
    }
}

/// Waits until the pod is ready, or fails with both containers' logs.
pub async fn wait_ready(pod: &Pod, within: Duration) -> Result<Duration, String> {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if pod.is_ready() {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs: Vec<String> = pod
        .containers
        .iter()
        .map(|c| format!("--- {} ---\n{}", c.name, pod.logs(&c.name)))
        .collect();
    Err(format!(
        "pod {} not ready after {within:?}\n{}",
        pod.name,
        logs.join("\n")
    ))
}

/// A Service: a round-robin TCP proxy over the ready pods' `target_port`.
pub struct Service {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// The endpoints a Service forwards to: the pods, each with its readiness.
pub type Endpoints = Arc<Mutex<Vec<(String, Arc<AtomicBool>)>>>;

impl Service {
    pub async fn start(endpoints: Endpoints, target_port: u16) -> Service {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let ready: Vec<String> = endpoints
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, r)| r.load(Ordering::SeqCst))
                    .map(|(ip, _)| ip.clone())
                    .collect();
                if ready.is_empty() {
                    continue; // connection refused-ish: dropped
                }
                let ip = ready[next.fetch_add(1, Ordering::Relaxed) % ready.len()].clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect((ip.as_str(), target_port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Service { addr, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An endpoint entry for a pod (its IP and its readiness flag).
pub fn endpoint(pod: &Pod) -> (String, Arc<AtomicBool>) {
    (pod.ip.clone(), pod.ready.clone())
}

/// The Deployment's pod template in a rendered stream.
pub fn pod_template(rendered: &str) -> Value {
    objects(rendered)
        .into_iter()
        .find(|o| o["kind"] == "Deployment")
        .map(|d| d["spec"]["template"].clone())
        .expect("a Deployment")
}

/// Writes a hosts file where `name` resolves to each of `ips` (a headless Service's endpoints).
pub fn write_hosts(path: &Path, name: &str, ips: &[String]) {
    write_hosts_for(path, &[(name, ips)]);
}

/// Writes a hosts file with several headless Services, each name resolving to its `ips`. A name
/// without addresses is absent, as cluster DNS answers NXDOMAIN for a Service without endpoints.
pub fn write_hosts_for(path: &Path, services: &[(&str, &[String])]) {
    let mut text = String::from("127.0.0.1 localhost\n");
    for (name, ips) in services {
        for ip in ips.iter() {
            text.push_str(&format!("{ip} {name}\n"));
        }
    }
    // Written in place: the containers bind-mount this inode (a rename would leave them the old
    // file), and readable by the containers' users.
    std::fs::write(path, text).expect("hosts file");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("hosts file mode");
}

/// A path under the repository root.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}
