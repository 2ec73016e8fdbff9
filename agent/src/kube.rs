//! Kubernetes metadata: the pods of this node, from the API server — a list, then a watch, of
//! the pods whose `spec.nodeName` is `NODE_NAME` (no other node's) — so each process's spans
//! carry `k8s.pod.name`, `k8s.pod.uid`, `k8s.namespace.name`, `k8s.node.name` and its
//! workload (`k8s.deployment.name`, ...). A process's pod is found from its cgroup path, where
//! the kubelet puts the pod's uid (`.../kubepods/.../pod<uid>/<container>`).
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde_json::Value;

/// What sockspan keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodMeta {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node: String,
    /// The workload that owns it: (kind, name), a ReplicaSet's Deployment resolved.
    pub workload: Option<(&'static str, String)>,
    /// Its `app.kubernetes.io/name` label.
    pub app_name: Option<String>,
}

impl PodMeta {
    /// From a pod object of the API (`metadata`, `spec.nodeName`); `None` without a name,
    /// namespace or uid.
    pub fn from_json(pod: &Value) -> Option<Self> {
        let meta = &pod["metadata"];
        let s = |v: &Value| v.as_str().map(str::to_owned);
        let labels = &meta["labels"];
        let owner = meta["ownerReferences"]
            .as_array()
            .and_then(|o| o.iter().find(|r| r["controller"].as_bool() == Some(true)).or(o.first()));
        let workload = owner.and_then(|o| {
            let name = o["name"].as_str()?;
            Some(match o["kind"].as_str()? {
                // A Deployment's ReplicaSet is named `<deployment>-<pod-template-hash>`.
                "ReplicaSet" => match labels["pod-template-hash"].as_str() {
                    Some(hash) if name.ends_with(&format!("-{hash}")) => {
                        ("deployment", name[..name.len() - hash.len() - 1].to_owned())
                    }
                    _ => ("replicaset", name.to_owned()),
                },
                "StatefulSet" => ("statefulset", name.to_owned()),
                "DaemonSet" => ("daemonset", name.to_owned()),
                "Job" => ("job", name.to_owned()),
                _ => return None,
            })
        });
        Some(Self {
            name: s(&meta["name"])?,
            namespace: s(&meta["namespace"])?,
            uid: s(&meta["uid"])?,
            node: s(&pod["spec"]["nodeName"]).unwrap_or_default(),
            workload,
            app_name: s(&labels["app.kubernetes.io/name"]),
        })
    }

    /// Its resource attributes, as the semantic conventions name them.
    pub fn attributes(&self) -> Vec<(String, &str)> {
        let mut a = vec![
            ("k8s.pod.name".to_owned(), self.name.as_str()),
            ("k8s.pod.uid".to_owned(), self.uid.as_str()),
            ("k8s.namespace.name".to_owned(), self.namespace.as_str()),
        ];
        if !self.node.is_empty() {
            a.push(("k8s.node.name".to_owned(), self.node.as_str()));
        }
        if let Some((kind, name)) = &self.workload {
            a.push((format!("k8s.{kind}.name"), name.as_str()));
        }
        a
    }

    /// The service name the pod gives its processes: its `app.kubernetes.io/name` label, else
    /// its workload's name (a process's own `OTEL_SERVICE_NAME` wins over both).
    pub fn service_name(&self) -> Option<&str> {
        self.app_name
            .as_deref()
            .or(self.workload.as_ref().map(|(_, n)| n.as_str()))
    }
}

/// The uid of the pod a cgroup path belongs to: the `pod<uid>` segment of a kubepods path
/// (`pod4a3c…` with dashes under cgroupfs, `kubepods-burstable-pod4a3c_….slice` with
/// underscores under systemd).
pub fn pod_uid(cgroup_path: &str) -> Option<String> {
    if !cgroup_path.contains("kubepods") {
        return None;
    }
    cgroup_path.split('/').find_map(|seg| {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        let uid = &seg[seg.rfind("pod")? + 3..];
        let uid = uid.replace('_', "-");
        let ok = uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        ok.then_some(uid)
    })
}

/// This node's pods by uid, shared by the watch (writer) and the process table (readers).
#[derive(Debug, Clone, Default)]
pub struct PodIndex(Arc<RwLock<HashMap<String, Arc<PodMeta>>>>);

impl PodIndex {
    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.0.read().ok()?.get(uid).cloned()
    }

    pub fn len(&self) -> usize {
        self.0.read().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn replace(&self, pods: impl IntoIterator<Item = PodMeta>) {
        if let Ok(mut m) = self.0.write() {
            *m = pods.into_iter().map(|p| (p.uid.clone(), Arc::new(p))).collect();
        }
    }

    /// A watch event: `ADDED`, `MODIFIED` or `DELETED` of a pod.
    fn apply(&self, kind: &str, pod: PodMeta) {
        if let Ok(mut m) = self.0.write() {
            if kind == "DELETED" {
                m.remove(&pod.uid);
            } else {
                m.insert(pod.uid.clone(), Arc::new(pod));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes metadata needs NODE_NAME (the downward API's spec.nodeName) to watch only this node's pods")]
    NoNodeName,
    #[error("not in a pod (no KUBERNETES_SERVICE_HOST) and no --kubernetes-api given")]
    NoApiServer,
    #[error("the service account's {what} ({path}): {source}")]
    ServiceAccount {
        what: &'static str,
        path: &'static str,
        source: std::io::Error,
    },
    #[error("the API server's client: {0}")]
    Client(String),
}

const TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Where the API server is and how to reach it.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `https://host:port` in a pod; any URL given (`kubectl proxy`'s `http://127.0.0.1:8001`).
    pub base: String,
    /// The service account's token, sent as a bearer token (re-read on each list: it rotates).
    pub token_file: Option<&'static str>,
    pub ca: Option<Vec<u8>>,
    pub node: String,
}

impl ApiConfig {
    /// In a pod: the service's address and the service account's token and CA; else `api`.
    pub fn from_env(api: Option<&str>, get: impl Fn(&str) -> Option<String>) -> Result<Self, KubeError> {
        let node = get("NODE_NAME")
            .filter(|n| !n.trim().is_empty())
            .ok_or(KubeError::NoNodeName)?;
        if let Some(base) = api {
            return Ok(Self {
                base: base.trim_end_matches('/').to_owned(),
                token_file: None,
                ca: None,
                node,
            });
        }
        let host = get("KUBERNETES_SERVICE_HOST").ok_or(KubeError::NoApiServer)?;
        let port = get("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let ca = std::fs::read(CA).map_err(|source| KubeError::ServiceAccount {
            what: "CA",
            path: CA,
            source,
        })?;
        std::fs::metadata(TOKEN).map_err(|source| KubeError::ServiceAccount {
            what: "token",
            path: TOKEN,
            source,
        })?;
        Ok(Self {
            base: format!("https://{host}:{port}"),
            token_file: Some(TOKEN),
            ca: Some(ca),
            node,
        })
    }

    fn client(&self) -> Result<reqwest::Client, KubeError> {
        crate::export::tls::install_crypto();
        let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(ca) = &self.ca {
            let certs = reqwest::Certificate::from_pem_bundle(ca).map_err(|e| KubeError::Client(e.to_string()))?;
            b = b.tls_certs_only(certs);
        }
        b.build().map_err(|e| KubeError::Client(e.to_string()))
    }

    fn request(&self, client: &reqwest::Client, query: &str) -> reqwest::RequestBuilder {
        let url = format!(
            "{}/api/v1/pods?fieldSelector=spec.nodeName%3D{}{query}",
            self.base,
            urlencode(&self.node)
        );
        let mut r = client.get(url);
        if let Some(t) = self.token_file.and_then(|f| std::fs::read_to_string(f).ok()) {
            r = r.bearer_auth(t.trim());
        }
        r
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The watch's counts, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct KubeCounts {
    /// Lists and watches that failed (each is retried after a backoff).
    pub api_errors: std::sync::atomic::AtomicU64,
    /// Pods known now.
    pub pods: std::sync::atomic::AtomicU64,
    /// Spans built for a process in a pod not (yet) known: exported without its metadata.
    pub spans_without_metadata: std::sync::atomic::AtomicU64,
}

impl KubeCounts {
    pub fn families(&self) -> Vec<crate::telemetry::Family> {
        use crate::telemetry::Family;
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            Family::level(
                "sockspan_kubernetes_pods",
                "This node's pods known from the API server (Kubernetes metadata on).",
                self.pods.load(Relaxed),
            ),
            Family::total(
                "sockspan_kubernetes_api_errors_total",
                "Lists and watches of this node's pods that failed (each retried after a backoff).",
                self.api_errors.load(Relaxed),
            ),
            Family::total(
                "sockspan_spans_without_kubernetes_metadata_total",
                "Spans of a process in a pod not known yet that waited 2 s for it and were exported without its k8s.* attributes (the pod is looked up again for 10 s).",
                self.spans_without_metadata.load(Relaxed),
            ),
        ]
    }
}

/// Keeps `index` current: lists this node's pods, then watches them; after an error, lists again
/// (backing off up to 30 s). `listed` is told after the first successful list.
pub async fn keep_current(
    cfg: ApiConfig,
    index: PodIndex,
    counts: Arc<KubeCounts>,
    listed: tokio::sync::oneshot::Sender<()>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut listed = Some(listed);
    let mut backoff = Duration::from_millis(500);
    let client = match cfg.client() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "No Kubernetes metadata");
            return;
        }
    };
    loop {
        match list_then_watch(&cfg, &client, &index, &counts, &mut listed).await {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                counts.api_errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, api = %cfg.base, "Kubernetes pods: list or watch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn list_then_watch(
    cfg: &ApiConfig,
    client: &reqwest::Client,
    index: &PodIndex,
    counts: &KubeCounts,
    listed: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), String> {
    use std::sync::atomic::Ordering::Relaxed;
    let resp = cfg
        .request(client, "")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("list: HTTP {}", resp.status()));
    }
    let body: Value =
        serde_json::from_slice(&resp.bytes().await.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let pods = body["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    index.replace(pods.iter().filter_map(PodMeta::from_json));
    counts.pods.store(index.len() as u64, Relaxed);
    if let Some(tx) = listed.take() {
        let _ = tx.send(());
    }
    let rv = body["metadata"]["resourceVersion"].as_str().unwrap_or("").to_owned();
    // A watch ends after its timeout (or the server's): then it is listed and watched again.
    let query = format!(
        "&watch=1&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion={}",
        urlencode(&rv)
    );
    let mut resp = cfg.request(client, &query).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("watch: HTTP {}", resp.status()));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            match ev["type"].as_str() {
                Some(kind @ ("ADDED" | "MODIFIED" | "DELETED")) => {
                    if let Some(pod) = PodMeta::from_json(&ev["object"]) {
                        index.apply(kind, pod);
                        counts.pods.store(index.len() as u64, Relaxed);
                    }
                }
                // 410 Gone and the like: the resource version is too old; list again.
                Some("ERROR") => return Err(format!("watch: {}", ev["object"]["message"])),
                _ => {}
            }
        }
        if buf.len() > 16 << 20 {
            return Err("watch: an event over 16 MiB".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_from_cgroup_paths() {
        let uid = "4a3c9b1e-7d2f-4c8a-9e6b-1f0d2c3b4a59";
        assert_eq!(
            pod_uid(&format!("/kubepods/burstable/pod{uid}/0123abcd")).as_deref(),
            Some(uid)
        );
        let systemd = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-ab.scope",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid(&systemd).as_deref(), Some(uid));
        assert_eq!(pod_uid("/system.slice/nginx.service"), None);
        assert_eq!(pod_uid("/kubepods/burstable"), None);
    }

    #[test]
    fn pods_from_the_api() {
        let pod = serde_json::json!({
            "metadata": {
                "name": "checkout-7d9f8b6c5d-x2k4p", "namespace": "shop", "uid": "u-1",
                "labels": {"pod-template-hash": "7d9f8b6c5d", "app.kubernetes.io/name": "checkout-api"},
                "ownerReferences": [{"kind": "ReplicaSet", "name": "checkout-7d9f8b6c5d", "controller": true}]
            },
            "spec": {"nodeName": "node-a"}
        });
        let p = PodMeta::from_json(&pod).unwrap();
        assert_eq!(p.workload, Some(("deployment", "checkout".to_owned())));
        assert_eq!(p.service_name(), Some("checkout-api"));
        let attrs = p.attributes();
        assert!(attrs.contains(&("k8s.deployment.name".to_owned(), "checkout")));
        assert!(attrs.contains(&("k8s.node.name".to_owned(), "node-a")));
        let mut sts = pod.clone();
        sts["metadata"]["labels"] = serde_json::json!({});
        sts["metadata"]["ownerReferences"] =
            serde_json::json!([{"kind": "StatefulSet", "name": "db", "controller": true}]);
        let p = PodMeta::from_json(&sts).unwrap();
        assert_eq!(p.service_name(), Some("db"), "no label: the workload's name");
        assert!(PodMeta::from_json(&serde_json::json!({"metadata": {"name": "x"}})).is_none());
    }

    #[test]
    fn in_a_pod_or_given_an_api() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
        };
        assert!(matches!(
            ApiConfig::from_env(None, env(&[])),
            Err(KubeError::NoNodeName)
        ));
        assert!(matches!(
            ApiConfig::from_env(None, env(&[("NODE_NAME", "n")])),
            Err(KubeError::NoApiServer)
        ));
        let c = ApiConfig::from_env(Some("http://127.0.0.1:8001/"), env(&[("NODE_NAME", "n 1")])).unwrap();
        assert_eq!(c.base, "http://127.0.0.1:8001");
        assert_eq!(urlencode(&c.node), "n%201");
    }
}
