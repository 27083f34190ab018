//! The kube-apiserver's CEL environment for CRD validation rules, as a static checker: which
//! functions exist from which Kubernetes version, which are methods (`q.compareTo(r)`) and which
//! are global (`sign(q)`), their overloads, and the estimated cost the API server charges a rule.
//!
//! kube's CEL library (what `validation.rs` evaluates with) is dynamic: it calls any function in
//! either style and has no types, so `quantity(s).sign()` ran there and was refused by a real API
//! server ("found no matching overload for 'sign' applied to 'kubernetes.Quantity.()'"). This
//! checker types every expression from the CRD's schema and resolves each call against the
//! declarations below, transcribed from k8s.io/apiserver/pkg/cel/library (quantity.go, lists.go,
//! regex.go, urls.go, ip.go, cidr.go, format.go), cel-go's standard library and its `ext.Strings`
//! and `ext.Sets`, with the versions from k8s.io/apiserver/pkg/cel/environment/base.go.
//!
//! A rule in a new CRD is compiled with the environment of the server's *compatibility* version,
//! one minor below the server's own (1.29 compiles with 1.28's functions), so a CRD meant for 1.29
//! may use only what 1.28 declared.
//!
//! Cost: cel-go's static estimator as the API server configures it (`has()` free, string work at
//! 0.1 per byte, regexes at 0.25 per pattern byte, the Kubernetes library's costs from
//! library/cost.go), with string and list bounds from the schema: `maxLength` x 4 bytes, or the
//! 3 MiB request when unbounded. A rule's cost is multiplied by how many times it can run (the
//! `maxItems` of the lists above it) and must stay within 10,000,000 (the per-rule limit); the
//! CRD's sum within 100,000,000 (apiextensions' StaticEstimatedCostLimit and
//! StaticEstimatedCRDCostLimit).
//!
//! Not modelled: optional types, two-variable comprehensions, the authz library (not offered to
//! CRDs), timestamp and duration accessor methods, and messageExpression.

#![allow(dead_code)]

use std::collections::BTreeMap;

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use serde_json::Value;

pub const PER_RULE_LIMIT: f64 = 10_000_000.0;
pub const PER_CRD_LIMIT: f64 = 100_000_000.0;
/// celconfig.MaxRequestSizeBytes: what an unbounded string or list is assumed to fill.
const MAX_REQUEST: f64 = 3.0 * 1024.0 * 1024.0;
const STRING_TRAVERSAL: f64 = 0.1;
const REGEX_LENGTH: f64 = 0.25;

#[derive(Clone, Debug, PartialEq)]
pub enum Ty {
    Int,
    Uint,
    Double,
    String,
    Bool,
    Bytes,
    Null,
    Dyn,
    Duration,
    Timestamp,
    Type,
    Quantity,
    Url,
    Ip,
    Cidr,
    Format,
    List(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
    /// An object of the schema, by its schema.
    Object(Box<Value>),
}

impl Ty {
    fn name(&self) -> String {
        match self {
            Ty::Int => "int".into(),
            Ty::Uint => "uint".into(),
            Ty::Double => "double".into(),
            Ty::String => "string".into(),
            Ty::Bool => "bool".into(),
            Ty::Bytes => "bytes".into(),
            Ty::Null => "null_type".into(),
            Ty::Dyn => "dyn".into(),
            Ty::Duration => "google.protobuf.Duration".into(),
            Ty::Timestamp => "google.protobuf.Timestamp".into(),
            Ty::Type => "type".into(),
            Ty::Quantity => "kubernetes.Quantity".into(),
            Ty::Url => "kubernetes.URL".into(),
            Ty::Ip => "net.IP".into(),
            Ty::Cidr => "net.CIDR".into(),
            Ty::Format => "kubernetes.NamedFormat".into(),
            Ty::List(e) => format!("list({})", e.name()),
            Ty::Map(k, v) => format!("map({}, {})", k.name(), v.name()),
            Ty::Object(_) => "object".into(),
        }
    }
}

/// A parameter of an overload.
#[derive(Clone, Copy, Debug)]
enum P {
    Int,
    Uint,
    Double,
    String,
    Bool,
    Bytes,
    Duration,
    Timestamp,
    Quantity,
    Url,
    Ip,
    Cidr,
    Format,
    /// Any list.
    List,
    /// A list of strings.
    Strings,
    Map,
    /// Anything (a type parameter).
    Any,
}

/// What an overload returns.
#[derive(Clone, Copy, Debug)]
enum R {
    T(P),
    /// The element type of the first argument's list.
    Elem,
    /// The first argument's type.
    First,
    StringList,
    Dyn,
    Type,
    QueryMap,
}

struct Overload {
    member: bool,
    params: &'static [P],
    ret: R,
    /// The Kubernetes minor version that introduced it (in the base environment).
    since: u32,
}

const fn g(params: &'static [P], ret: R, since: u32) -> Overload {
    Overload {
        member: false,
        params,
        ret,
        since,
    }
}
const fn m(params: &'static [P], ret: R, since: u32) -> Overload {
    Overload {
        member: true,
        params,
        ret,
        since,
    }
}

fn declarations() -> BTreeMap<&'static str, Vec<Overload>> {
    use P::*;
    let b = R::T(Bool);
    let i = R::T(Int);
    let s = R::T(String);
    let numeric: &[&'static [P]] = &[&[Int, Int], &[Uint, Uint], &[Double, Double]];
    let mut d: BTreeMap<&'static str, Vec<Overload>> = BTreeMap::new();
    let mut add = |name: &'static str, o: Overload| d.entry(name).or_default().push(o);

    // cel-go's standard library (always present).
    for op in ["_&&_", "_||_"] {
        add(op, g(&[Bool, Bool], b, 0));
    }
    add("!_", g(&[Bool], b, 0));
    add("-_", g(&[Int], i, 0));
    add("-_", g(&[Double], R::T(Double), 0));
    for op in ["_+_", "_-_", "_*_", "_/_"] {
        for params in numeric {
            add(op, g(params, R::First, 0));
        }
    }
    add("_%_", g(&[Int, Int], i, 0));
    add("_%_", g(&[Uint, Uint], R::T(Uint), 0));
    add("_+_", g(&[String, String], s, 0));
    add("_+_", g(&[Bytes, Bytes], R::T(Bytes), 0));
    add("_+_", g(&[List, List], R::First, 0));
    add("_+_", g(&[Duration, Duration], R::T(Duration), 0));
    add("_+_", g(&[Timestamp, Duration], R::T(Timestamp), 0));
    add("_+_", g(&[Duration, Timestamp], R::T(Timestamp), 0));
    add("_-_", g(&[Timestamp, Timestamp], R::T(Duration), 0));
    add("_-_", g(&[Timestamp, Duration], R::T(Timestamp), 0));
    add("_-_", g(&[Duration, Duration], R::T(Duration), 0));
    for op in ["_<_", "_<=_", "_>_", "_>=_"] {
        for t in [Int, Uint, Double, String, Bytes, Bool, Duration, Timestamp] {
            let params: &'static [P] = Box::leak(Box::new([t, t]));
            add(op, g(params, b, 0));
        }
        // cel.CrossTypeNumericComparisons, from 1.28.
        for params in [
            &[Int, Double][..],
            &[Double, Int],
            &[Int, Uint],
            &[Uint, Int],
            &[Uint, Double],
            &[Double, Uint],
        ] {
            add(op, g(params, b, 28));
        }
    }
    add("size", g(&[String], i, 0));
    add("size", g(&[Bytes], i, 0));
    add("size", g(&[List], i, 0));
    add("size", g(&[Map], i, 0));
    add("size", m(&[String], i, 0));
    add("size", m(&[Bytes], i, 0));
    add("size", m(&[List], i, 0));
    add("size", m(&[Map], i, 0));
    for f in ["contains", "startsWith", "endsWith"] {
        add(f, m(&[String, String], b, 0));
    }
    add("matches", g(&[String, String], b, 0));
    add("matches", m(&[String, String], b, 0));
    for t in [Int, Uint, Double, String, Timestamp] {
        add("int", g(Box::leak(Box::new([t])), i, 0));
    }
    for t in [Int, Uint, Double, String] {
        add("uint", g(Box::leak(Box::new([t])), R::T(Uint), 0));
        add("double", g(Box::leak(Box::new([t])), R::T(Double), 0));
    }
    for t in [Int, Uint, Double, Bool, Bytes, String, Timestamp, Duration] {
        add("string", g(Box::leak(Box::new([t])), s, 0));
    }
    add("bytes", g(&[String], R::T(Bytes), 0));
    add("bool", g(&[String], b, 0));
    add("bool", g(&[Bool], b, 0));
    add("duration", g(&[String], R::T(Duration), 0));
    add("timestamp", g(&[String], R::T(Timestamp), 0));
    add("timestamp", g(&[Int], R::T(Timestamp), 0));
    add("dyn", g(&[Any], R::Dyn, 0));
    add("type", g(&[Any], R::Type, 0));

    // Kubernetes lists library, ListsVersion(0).
    add("isSorted", m(&[List], b, 0));
    for f in ["sum", "min", "max"] {
        add(f, m(&[List], R::Elem, 0));
    }
    add("indexOf", m(&[List, Any], i, 0));
    add("lastIndexOf", m(&[List, Any], i, 0));
    // Kubernetes regex library.
    add("find", m(&[String, String], s, 0));
    add("findAll", m(&[String, String], R::StringList, 0));
    add("findAll", m(&[String, String, Int], R::StringList, 0));
    // Kubernetes URL library.
    add("url", g(&[String], R::T(Url), 0));
    add("isURL", g(&[String], b, 0));
    for f in ["getScheme", "getHost", "getHostname", "getPort", "getEscapedPath"] {
        add(f, m(&[Url], s, 0));
    }
    add("getQuery", m(&[Url], R::QueryMap, 0));
    // cel-go ext.Strings (version 0 before 1.29, version 2 from 1.29).
    add("charAt", m(&[String, Int], s, 0));
    add("indexOf", m(&[String, String], i, 0));
    add("indexOf", m(&[String, String, Int], i, 0));
    add("lastIndexOf", m(&[String, String], i, 0));
    add("lastIndexOf", m(&[String, String, Int], i, 0));
    add("lowerAscii", m(&[String], s, 0));
    add("upperAscii", m(&[String], s, 0));
    add("replace", m(&[String, String, String], s, 0));
    add("replace", m(&[String, String, String, Int], s, 0));
    add("split", m(&[String, String], R::StringList, 0));
    add("split", m(&[String, String, Int], R::StringList, 0));
    add("substring", m(&[String, Int], s, 0));
    add("substring", m(&[String, Int, Int], s, 0));
    add("trim", m(&[String], s, 0));
    add("join", m(&[Strings], s, 0));
    add("join", m(&[Strings, String], s, 0));
    add("format", m(&[String, List], s, 29));
    add("strings.quote", g(&[String], s, 29));
    // Kubernetes quantity library, from 1.28: `sign` is global, the rest are methods.
    add("quantity", g(&[String], R::T(Quantity), 28));
    add("isQuantity", g(&[String], b, 28));
    add("sign", g(&[Quantity], i, 28));
    add("isGreaterThan", m(&[Quantity, Quantity], b, 28));
    add("isLessThan", m(&[Quantity, Quantity], b, 28));
    add("compareTo", m(&[Quantity, Quantity], i, 28));
    add("asApproximateFloat", m(&[Quantity], R::T(Double), 28));
    add("asInteger", m(&[Quantity], i, 28));
    add("isInteger", m(&[Quantity], b, 28));
    for f in ["add", "sub"] {
        add(f, m(&[Quantity, Quantity], R::T(Quantity), 28));
        add(f, m(&[Quantity, Int], R::T(Quantity), 28));
    }
    // cel-go ext.Sets, from 1.29.
    for f in ["sets.contains", "sets.equivalent", "sets.intersects"] {
        add(f, g(&[List, List], b, 29));
    }
    // Kubernetes IP and CIDR libraries, from 1.30.
    add("ip", g(&[String], R::T(Ip), 30));
    add("isIP", g(&[String], b, 30));
    add("ip.isCanonical", g(&[String], b, 30));
    add("family", m(&[Ip], i, 30));
    for f in [
        "isUnspecified",
        "isLoopback",
        "isLinkLocalMulticast",
        "isLinkLocalUnicast",
        "isGlobalUnicast",
    ] {
        add(f, m(&[Ip], b, 30));
    }
    add("string", g(&[Ip], s, 30));
    add("cidr", g(&[String], R::T(Cidr), 30));
    add("isCIDR", g(&[String], b, 30));
    add("containsIP", m(&[Cidr, Ip], b, 30));
    add("containsIP", m(&[Cidr, String], b, 30));
    add("containsCIDR", m(&[Cidr, Cidr], b, 30));
    add("containsCIDR", m(&[Cidr, String], b, 30));
    add("ip", m(&[Cidr], R::T(Ip), 30));
    add("masked", m(&[Cidr], R::T(Cidr), 30));
    add("prefixLength", m(&[Cidr], i, 30));
    add("string", g(&[Cidr], s, 30));
    // Kubernetes format library, from 1.31.
    for f in [
        "format.dns1123Label",
        "format.dns1123Subdomain",
        "format.dns1035Label",
        "format.qualifiedName",
        "format.labelValue",
        "format.uri",
        "format.uuid",
        "format.byte",
        "format.date",
        "format.datetime",
    ] {
        add(f, g(&[], R::T(Format), 31));
    }
    add("format.named", g(&[String], R::Dyn, 31));
    add("validate", m(&[Format, String], R::Dyn, 31));
    d
}

/// A typed expression with its size bound (string bytes, list items) and estimated cost.
#[derive(Clone, Debug)]
struct Checked {
    ty: Ty,
    size: f64,
    cost: f64,
}

pub struct Env {
    decls: BTreeMap<&'static str, Vec<Overload>>,
    /// The compatibility version's minor: functions introduced later are absent.
    minor: u32,
}

/// What a rule compiles to: its estimated cost (not yet multiplied by its cardinality).
#[derive(Debug)]
pub struct Compiled {
    pub cost: f64,
}

impl Env {
    /// The environment a kube-apiserver 1.`server_minor` compiles a new CRD's rules with.
    pub fn for_server(server_minor: u32) -> Env {
        Env {
            decls: declarations(),
            minor: server_minor - 1,
        }
    }

    /// Compiles `rule` with `self` of the given schema, as the API server would, or says why
    /// it refuses it (the message reads like the API server's).
    pub fn compile(&self, rule: &str, self_schema: &Value, root: bool) -> Result<Compiled, String> {
        let ast = cel::parser::Parser::new()
            .parse(rule)
            .map_err(|e| format!("compilation failed: syntax: {e}"))?;
        let mut scope = vec![("self".to_string(), schema_type(self_schema, root))];
        let out = self.check(&ast, &mut scope)?;
        if !matches!(out.ty.ty, Ty::Bool | Ty::Dyn) {
            return Err(format!("rule must evaluate to bool, not {}", out.ty.ty.name()));
        }
        Ok(Compiled { cost: out.cost })
    }

    fn check(&self, e: &IdedExpr, scope: &mut Vec<(String, Checked)>) -> Result<Out, String> {
        match &e.expr {
            Expr::Literal(l) => Ok(Out::of(match l {
                LiteralValue::Boolean(_) => Ty::Bool,
                LiteralValue::Bytes(b) => return Ok(Out::sized(Ty::Bytes, b.len() as f64, 0.0)),
                LiteralValue::Double(_) => Ty::Double,
                LiteralValue::Int(_) => Ty::Int,
                LiteralValue::String(s) => return Ok(Out::sized(Ty::String, s.len() as f64, 0.0)),
                LiteralValue::UInt(_) => Ty::Uint,
                LiteralValue::Null => Ty::Null,
            })),
            Expr::Ident(name) => match scope.iter().rev().find(|(n, _)| n == name) {
                Some((_, c)) => Ok(Out {
                    ty: c.clone(),
                    cost: 1.0,
                }),
                None => Err(format!("compilation failed: undeclared reference to '{name}'")),
            },
            Expr::Select(sel) => {
                let operand = self.check(&sel.operand, scope)?;
                let field = match &operand.ty.ty {
                    Ty::Object(schema) => match schema.get("properties").and_then(|p| p.get(&sel.field)) {
                        Some(prop) => schema_type(prop, false),
                        None => return Err(format!("compilation failed: undefined field '{}'", sel.field)),
                    },
                    Ty::Map(_, v) => Checked {
                        ty: (**v).clone(),
                        size: MAX_REQUEST,
                        cost: 0.0,
                    },
                    Ty::Dyn => Checked {
                        ty: Ty::Dyn,
                        size: MAX_REQUEST,
                        cost: 0.0,
                    },
                    other => {
                        return Err(format!(
                            "compilation failed: type '{}' does not support field selection",
                            other.name()
                        ))
                    }
                };
                if sel.test {
                    // has(): free (PresenceTestHasCost(false)).
                    return Ok(Out::sized(Ty::Bool, 1.0, operand.cost));
                }
                Ok(Out {
                    ty: field,
                    cost: operand.cost + 1.0,
                })
            }
            Expr::List(list) => {
                let mut elem = None;
                let mut cost = 0.0;
                for el in &list.elements {
                    let c = self.check(el, scope)?;
                    cost += c.cost;
                    match &elem {
                        None => elem = Some(c.ty.ty.clone()),
                        Some(t) if *t == c.ty.ty || c.ty.ty == Ty::Dyn || *t == Ty::Dyn => {}
                        Some(t) => {
                            return Err(format!(
                            "compilation failed: expected type '{}' but found '{}' (homogeneous aggregate literals)",
                            t.name(),
                            c.ty.ty.name()
                        ))
                        }
                    }
                }
                Ok(Out::sized(
                    Ty::List(Box::new(elem.unwrap_or(Ty::Dyn))),
                    list.elements.len() as f64,
                    cost + 10.0,
                ))
            }
            Expr::Map(map) => {
                let mut cost = 0.0;
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(me) = &entry.expr {
                        cost += self.check(&me.key, scope)?.cost + self.check(&me.value, scope)?.cost;
                    }
                }
                Ok(Out::sized(
                    Ty::Map(Box::new(Ty::Dyn), Box::new(Ty::Dyn)),
                    map.entries.len() as f64,
                    cost + 30.0,
                ))
            }
            Expr::Struct(_) => Err("compilation failed: message construction is not available".into()),
            Expr::Unspecified => Err("compilation failed: empty expression".into()),
            Expr::Comprehension(c) => {
                let range = self.check(&c.iter_range, scope)?;
                let iter = match &range.ty.ty {
                    Ty::List(e) => (**e).clone(),
                    Ty::Map(k, _) => (**k).clone(),
                    Ty::Dyn => Ty::Dyn,
                    other => {
                        return Err(format!(
                            "compilation failed: expression of type '{}' cannot be the range of a comprehension",
                            other.name()
                        ))
                    }
                };
                let element_size = match &range.ty.ty {
                    Ty::List(_) => range.ty.size.min(MAX_REQUEST),
                    _ => MAX_REQUEST,
                };
                let init = self.check(&c.accu_init, scope)?;
                scope.push((
                    c.iter_var.clone(),
                    Checked {
                        ty: iter,
                        size: element_size,
                        cost: 0.0,
                    },
                ));
                scope.push((c.accu_var.clone(), init.ty.clone()));
                let cond = self.check(&c.loop_cond, scope)?;
                let step = self.check(&c.loop_step, scope)?;
                scope.pop();
                scope.pop();
                scope.push((c.accu_var.clone(), step.ty.clone()));
                let result = self.check(&c.result, scope)?;
                scope.pop();
                let n = range.ty.size;
                Ok(Out {
                    ty: result.ty,
                    cost: range.cost + init.cost + n * (cond.cost + step.cost) + result.cost,
                })
            }
            Expr::Call(call) => self.call(&call.func_name, call.target.as_deref(), &call.args, scope),
        }
    }

    fn call(
        &self,
        name: &str,
        target: Option<&IdedExpr>,
        args: &[IdedExpr],
        scope: &mut Vec<(String, Checked)>,
    ) -> Result<Out, String> {
        let mut operands = Vec::new();
        if let Some(t) = target {
            operands.push(self.check(t, scope)?);
        }
        for a in args {
            operands.push(self.check(a, scope)?);
        }
        let args_cost: f64 = operands.iter().map(|o| o.cost).sum();
        match name {
            "_?_:_" => {
                let [c, t, f] = &operands[..] else { unreachable!() };
                if !matches!(c.ty.ty, Ty::Bool | Ty::Dyn) {
                    return Err(format!("compilation failed: condition of type '{}'", c.ty.ty.name()));
                }
                let ty = if t.ty.ty == f.ty.ty || f.ty.ty == Ty::Null {
                    t.ty.ty.clone()
                } else if t.ty.ty == Ty::Dyn || f.ty.ty == Ty::Dyn || t.ty.ty == Ty::Null {
                    f.ty.ty.clone()
                } else {
                    return Err(format!(
                        "compilation failed: no matching overload for '_?_:_' applied to '(bool, {}, {})'",
                        t.ty.ty.name(),
                        f.ty.ty.name()
                    ));
                };
                return Ok(Out::sized(ty, t.ty.size.max(f.ty.size), c.cost + t.cost.max(f.cost)));
            }
            "_==_" | "_!=_" => {
                let [l, r] = &operands[..] else { unreachable!() };
                let same = l.ty.ty == r.ty.ty
                    || matches!(l.ty.ty, Ty::Dyn | Ty::Null)
                    || matches!(r.ty.ty, Ty::Dyn | Ty::Null)
                    || matches!(
                        (&l.ty.ty, &r.ty.ty),
                        (Ty::List(_), Ty::List(_)) | (Ty::Map(..), Ty::Map(..))
                    );
                if !same {
                    return Err(no_overload(name, false, &operands));
                }
                let cost = match l.ty.ty {
                    Ty::String | Ty::Bytes => (l.ty.size.min(r.ty.size) * STRING_TRAVERSAL).ceil(),
                    _ => 1.0,
                };
                return Ok(Out::sized(Ty::Bool, 1.0, args_cost + cost));
            }
            "@in" => {
                let [_, container] = &operands[..] else { unreachable!() };
                if !matches!(container.ty.ty, Ty::List(_) | Ty::Map(..) | Ty::Dyn) {
                    return Err(no_overload(name, false, &operands));
                }
                return Ok(Out::sized(Ty::Bool, 1.0, args_cost + container.ty.size.max(1.0)));
            }
            "_[_]" => {
                let [container, _] = &operands[..] else { unreachable!() };
                let ty = match &container.ty.ty {
                    Ty::List(e) => (**e).clone(),
                    Ty::Map(_, v) => (**v).clone(),
                    Ty::Dyn => Ty::Dyn,
                    _ => return Err(no_overload(name, false, &operands)),
                };
                return Ok(Out::sized(ty, MAX_REQUEST, args_cost + 1.0));
            }
            "@not_strictly_false" => return Ok(Out::sized(Ty::Bool, 1.0, args_cost)),
            _ => {}
        }
        let member = target.is_some();
        let candidates: Vec<&Overload> = self
            .decls
            .get(name)
            .into_iter()
            .flatten()
            .filter(|o| o.since <= self.minor && o.member == member && o.params.len() == operands.len())
            .filter(|o| o.params.iter().zip(&operands).all(|(p, a)| accepts(*p, &a.ty.ty)))
            .collect();
        let Some(chosen) = candidates.first() else {
            if self
                .decls
                .get(name)
                .is_none_or(|all| all.iter().all(|o| o.since > self.minor))
            {
                return Err(format!("compilation failed: undeclared reference to '{name}'"));
            }
            return Err(no_overload(name, member, &operands));
        };
        // With a dyn argument several overloads match; the result is then dyn unless they agree.
        let ty = {
            let first = result_type(chosen.ret, &operands);
            if candidates.iter().all(|o| result_type(o.ret, &operands) == first) {
                first
            } else {
                Ty::Dyn
            }
        };
        let size_of = |k: usize| operands.get(k).map_or(0.0, |o| o.ty.size);
        let traverse = |k: usize| (size_of(k) * STRING_TRAVERSAL).ceil();
        let (cost, size) = match name {
            "matches" => (traverse(0) * (size_of(1) * REGEX_LENGTH).ceil(), 1.0),
            "find" | "findAll" => (traverse(0) * (size_of(1) * REGEX_LENGTH).ceil(), size_of(0)),
            "contains" | "startsWith" | "endsWith" => (traverse(0) * traverse(1).max(1.0), 1.0),
            "_+_" if matches!(ty, Ty::String | Ty::Bytes) => (traverse(0) + traverse(1), size_of(0) + size_of(1)),
            "_+_" if matches!(ty, Ty::List(_)) => (size_of(0) + size_of(1), size_of(0) + size_of(1)),
            "_<_" | "_<=_" | "_>_" | "_>=_" if matches!(operands[0].ty.ty, Ty::String | Ty::Bytes) => {
                (traverse(0).min(traverse(1)).max(1.0), 1.0)
            }
            "quantity" | "isQuantity" | "url" | "isURL" | "cidr" | "isIP" | "isCIDR" | "ip" | "timestamp"
            | "duration" | "lowerAscii" | "upperAscii" | "trim" | "substring" | "replace" | "split" => {
                (traverse(0).max(1.0), size_of(0))
            }
            "isSorted" | "sum" | "min" | "max" | "indexOf" | "lastIndexOf" => (size_of(0).max(1.0), 1.0),
            "sets.contains" | "sets.equivalent" | "sets.intersects" => (size_of(0) * size_of(1), 1.0),
            // Conversions keep the argument's bound (a string of a dyn is as long as the dyn).
            "string" | "bytes" | "dyn" => (1.0, size_of(0)),
            _ => (1.0, 1.0),
        };
        Ok(Out::sized(ty, size, args_cost + cost))
    }
}

struct Out {
    ty: Checked,
    cost: f64,
}

impl Out {
    fn of(ty: Ty) -> Out {
        Out::sized(ty, 1.0, 0.0)
    }
    fn sized(ty: Ty, size: f64, cost: f64) -> Out {
        Out {
            ty: Checked { ty, size, cost: 0.0 },
            cost,
        }
    }
}

fn no_overload(name: &str, member: bool, operands: &[Out]) -> String {
    let types: Vec<String> = operands.iter().map(|o| o.ty.ty.name()).collect();
    if member {
        format!(
            "compilation failed: found no matching overload for '{name}' applied to '{}.({})'",
            types[0],
            types[1..].join(", ")
        )
    } else {
        format!(
            "compilation failed: found no matching overload for '{name}' applied to '({})'",
            types.join(", ")
        )
    }
}

fn accepts(p: P, t: &Ty) -> bool {
    use P::*;
    if *t == Ty::Dyn {
        return true;
    }
    match (p, t) {
        (Any, _) => true,
        (Int, Ty::Int)
        | (Uint, Ty::Uint)
        | (Double, Ty::Double)
        | (String, Ty::String)
        | (Bool, Ty::Bool)
        | (Bytes, Ty::Bytes)
        | (Duration, Ty::Duration)
        | (Timestamp, Ty::Timestamp)
        | (Quantity, Ty::Quantity)
        | (Url, Ty::Url)
        | (Ip, Ty::Ip)
        | (Cidr, Ty::Cidr)
        | (Format, Ty::Format)
        | (List, Ty::List(_))
        | (Map, Ty::Map(..) | Ty::Object(_)) => true,
        (Strings, Ty::List(e)) => matches!(**e, Ty::String | Ty::Dyn),
        _ => false,
    }
}

fn result_type(r: R, operands: &[Out]) -> Ty {
    use P::*;
    match r {
        R::T(p) => match p {
            Int => Ty::Int,
            Uint => Ty::Uint,
            Double => Ty::Double,
            String => Ty::String,
            Bool => Ty::Bool,
            Bytes => Ty::Bytes,
            Duration => Ty::Duration,
            Timestamp => Ty::Timestamp,
            Quantity => Ty::Quantity,
            Url => Ty::Url,
            Ip => Ty::Ip,
            Cidr => Ty::Cidr,
            Format => Ty::Format,
            _ => Ty::Dyn,
        },
        R::Elem => match operands.first().map(|o| &o.ty.ty) {
            Some(Ty::List(e)) => (**e).clone(),
            _ => Ty::Dyn,
        },
        R::First => operands.first().map_or(Ty::Dyn, |o| o.ty.ty.clone()),
        R::StringList => Ty::List(Box::new(Ty::String)),
        R::Dyn => Ty::Dyn,
        R::Type => Ty::Type,
        R::QueryMap => Ty::Map(Box::new(Ty::String), Box::new(Ty::List(Box::new(Ty::String)))),
    }
}

/// The CEL type of a schema node, with its size bound (apiserver pkg/cel/common/schemas.go).
fn schema_type(schema: &Value, root: bool) -> Checked {
    let max_length = schema.get("maxLength").and_then(Value::as_f64);
    let string_size = max_length.map_or(MAX_REQUEST - 2.0, |l| l * 4.0);
    let ty = if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        Ty::Dyn
    } else {
        match schema.get("type").and_then(Value::as_str) {
            Some("string") => match schema.get("format").and_then(Value::as_str) {
                Some("byte") => Ty::Bytes,
                Some("duration") => Ty::Duration,
                Some("date") | Some("date-time") => Ty::Timestamp,
                _ => Ty::String,
            },
            Some("integer") => Ty::Int,
            Some("number") => Ty::Double,
            Some("boolean") => Ty::Bool,
            Some("array") => {
                let items = schema.get("items").cloned().unwrap_or(Value::Null);
                let n = schema
                    .get("maxItems")
                    .and_then(Value::as_f64)
                    .unwrap_or((MAX_REQUEST - 2.0) / 3.0);
                return Checked {
                    ty: Ty::List(Box::new(schema_type(&items, false).ty)),
                    size: n,
                    cost: 0.0,
                };
            }
            Some("object") => match schema.get("additionalProperties").filter(|a| a.is_object()) {
                Some(values) => Ty::Map(Box::new(Ty::String), Box::new(schema_type(values, false).ty)),
                None => {
                    let mut schema = schema.clone();
                    if root {
                        // apiVersion, kind, metadata.name and metadata.generateName are always there.
                        let string = serde_json::json!({"type": "string"});
                        let props = schema["properties"].as_object_mut().expect("root properties");
                        props.entry("apiVersion").or_insert(string.clone());
                        props.entry("kind").or_insert(string.clone());
                        let meta = props.entry("metadata").or_insert(serde_json::json!({"type": "object"}));
                        let meta_props = meta
                            .as_object_mut()
                            .expect("metadata schema")
                            .entry("properties")
                            .or_insert(serde_json::json!({}));
                        meta_props
                            .as_object_mut()
                            .expect("metadata properties")
                            .entry("name")
                            .or_insert(string.clone());
                        meta_props
                            .as_object_mut()
                            .expect("metadata properties")
                            .entry("generateName")
                            .or_insert(string);
                    }
                    Ty::Object(Box::new(schema))
                }
            },
            _ => Ty::Dyn,
        }
    };
    Checked {
        ty,
        size: string_size,
        cost: 0.0,
    }
}

/// A rule found in a CRD schema: where it is, its text, how often it can run.
#[derive(Debug, Clone)]
pub struct FoundRule {
    pub path: String,
    pub rule: String,
    pub schema: Value,
    pub root: bool,
    pub cardinality: f64,
}

/// Every `x-kubernetes-validations` rule under `schema`.
pub fn rules(schema: &Value) -> Vec<FoundRule> {
    let mut out = Vec::new();
    walk(schema, "", true, 1.0, &mut out);
    out
}

fn walk(schema: &Value, path: &str, root: bool, cardinality: f64, out: &mut Vec<FoundRule>) {
    for rule in schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push(FoundRule {
            path: if path.is_empty() { "<root>".into() } else { path.into() },
            rule: rule["rule"].as_str().unwrap_or_default().into(),
            schema: schema.clone(),
            root,
            cardinality,
        });
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            walk(prop, &format!("{path}.{name}"), false, cardinality, out);
        }
    }
    if let Some(items) = schema.get("items") {
        let n = schema
            .get("maxItems")
            .and_then(Value::as_f64)
            .unwrap_or((MAX_REQUEST - 2.0) / 3.0);
        walk(items, &format!("{path}[]"), false, cardinality * n, out);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        let n = schema
            .get("maxProperties")
            .and_then(Value::as_f64)
            .unwrap_or((MAX_REQUEST - 2.0) / 8.0);
        walk(values, &format!("{path}[*]"), false, cardinality * n, out);
    }
}
