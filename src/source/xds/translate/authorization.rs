//! How ztunnel's Authorization becomes the CRD-shaped [`AuthorizationPolicy`] (exactly, no
//! widening): ztunnel's semantics are rule = AND of clauses, clause = OR of matches, match =
//! AND of fields (a list matches by any value, a `not_` list by none). The CRD's rule is
//! `from` (OR of sources) AND `to` (OR of operations) AND every `when`. A clause whose
//! matches all fit a `Source` becomes `from`, one whose matches are all ports becomes `to`,
//! and a single match can always be written as `when` conditions (`source.principal`,
//! `source.namespace`, `source.ip`, `destination.ip`, `destination.port`). Any other clause
//! is distributed: the rule is split into one rule per match of that clause (rules OR), which
//! is equivalent. `service_accounts` become principal suffixes `/ns/<ns>/sa/<sa>` (exact,
//! since SPIFFE path segments hold no `/`). The scope and dry-run flag use the model's
//! [`PolicyScope`] and `dry_run` extensions.
//!
//! Owns [`authorization`]: one `istio.security.Authorization` checked and translated, or
//! refused with an [`AuthorizationError`] naming the policy, the rule and the field. The
//! scope of a selector policy (which workloads name it) is the assembly's to fill in. No
//! I/O, no protocol state.

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::{ip_from_bytes, port, FieldError};
use crate::model::policy::{
    Action, AuthorizationPolicySpec, Condition, ConditionKey, IpBlock, Operation, PolicyScope,
    PortNumber, Rule, RuleFrom, RuleTo, Source, StringMatch,
};
use crate::model::AuthorizationPolicy;
use crate::proto::istio::security as xsec;

/// Most CRD rules one xDS rule may expand into (distribution multiplies them).
const MAX_RULES_PER_RULE: usize = 256;

/// Why an `Authorization` resource is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizationError {
    /// A policy missing its name or namespace.
    #[error("authorization {namespace}/{name}: name and namespace are required")]
    Names {
        /// Its namespace as sent.
        namespace: String,
        /// Its name as sent.
        name: String,
    },
    /// A scope this version does not know.
    #[error("authorization {namespace}/{name}: unknown scope {scope}")]
    Scope {
        /// The policy's namespace.
        namespace: String,
        /// The policy's name.
        name: String,
        /// The scope number sent.
        scope: i32,
    },
    /// An action this version does not know.
    #[error("authorization {namespace}/{name}: unknown action {action}")]
    Action {
        /// The policy's namespace.
        namespace: String,
        /// The policy's name.
        name: String,
        /// The action number sent.
        action: i32,
    },
    /// A rule that cannot be translated.
    #[error("authorization {namespace}/{name}: rules[{index}]: {error}")]
    Rule {
        /// The policy's namespace.
        namespace: String,
        /// The policy's name.
        name: String,
        /// The rule's index.
        index: usize,
        /// What is wrong with it.
        #[source]
        error: RuleError,
    },
}

/// Why one rule of an `Authorization` cannot be translated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// A match that does not hold what it must.
    #[error("clauses[{clause}].matches[{index}].{error}")]
    Match {
        /// The clause's index.
        clause: usize,
        /// The match's index in the clause.
        index: usize,
        /// The field and what is wrong.
        #[source]
        error: MatchError,
    },
    /// Distribution would make too many CRD rules of it.
    #[error("expands into more than {MAX_RULES_PER_RULE} rules; refusing it")]
    TooManyRules,
}

/// A field of one match that does not hold what it must.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    /// A string match with no match type.
    #[error("{what}[{index}]: no match type")]
    NoMatchType {
        /// The field.
        what: &'static str,
        /// The entry's index.
        index: usize,
    },
    /// A service account match missing its namespace or name.
    #[error("{what}[{index}]: namespace and serviceAccount are required")]
    ServiceAccount {
        /// The field.
        what: &'static str,
        /// The entry's index.
        index: usize,
    },
    /// A prefix length that does not fit the address.
    #[error("{what}[{index}]: /{length} is not a prefix length for {ip}")]
    PrefixLength {
        /// The field.
        what: &'static str,
        /// The entry's index.
        index: usize,
        /// The length sent.
        length: u32,
        /// The address.
        ip: std::net::IpAddr,
    },
    /// An address or port that does not hold what it must.
    #[error(transparent)]
    Field(#[from] FieldError),
}

/// Checks and translates one `Authorization`. The scope of a `WORKLOAD_SELECTOR` policy is
/// left empty here; [`assemble`](super::assemble) fills in the workloads that name it.
pub fn authorization(a: xsec::Authorization) -> Result<AuthorizationPolicy, AuthorizationError> {
    if a.name.is_empty() || a.namespace.is_empty() {
        return Err(AuthorizationError::Names {
            namespace: a.namespace,
            name: a.name,
        });
    }
    let (namespace, name) = (a.namespace.clone(), a.name.clone());
    let scope = match xsec::Scope::try_from(a.scope) {
        Ok(xsec::Scope::Global) => PolicyScope::Mesh,
        Ok(xsec::Scope::Namespace) => PolicyScope::Namespace,
        Ok(xsec::Scope::WorkloadSelector) => PolicyScope::Workloads(BTreeSet::new()),
        Err(_) => {
            return Err(AuthorizationError::Scope {
                namespace,
                name,
                scope: a.scope,
            })
        }
    };
    let action = match xsec::Action::try_from(a.action) {
        Ok(xsec::Action::Allow) => Action::Allow,
        Ok(xsec::Action::Deny) => Action::Deny,
        Err(_) => {
            return Err(AuthorizationError::Action {
                namespace,
                name,
                action: a.action,
            })
        }
    };
    let mut rules = Vec::new();
    for (i, rule) in a.rules.iter().enumerate() {
        rules.extend(
            translate_rule(rule).map_err(|error| AuthorizationError::Rule {
                namespace: namespace.clone(),
                name: name.clone(),
                index: i,
                error,
            })?,
        );
    }
    Ok(AuthorizationPolicy {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        spec: AuthorizationPolicySpec {
            rules,
            action,
            scope,
            dry_run: a.dry_run,
            ..AuthorizationPolicySpec::default()
        },
    })
}

/// One match, parsed: each field a positive and a negative list.
#[derive(Default)]
struct MatchParts {
    namespaces: (Vec<StringMatch>, Vec<StringMatch>),
    principals: (Vec<StringMatch>, Vec<StringMatch>),
    /// `service_accounts` as principal suffixes.
    accounts: (Vec<StringMatch>, Vec<StringMatch>),
    source_ips: (Vec<IpNet>, Vec<IpNet>),
    destination_ips: (Vec<IpNet>, Vec<IpNet>),
    ports: (Vec<PortNumber>, Vec<PortNumber>),
}

fn both_empty<T>(p: &(Vec<T>, Vec<T>)) -> bool {
    p.0.is_empty() && p.1.is_empty()
}

impl MatchParts {
    fn parse(m: &xsec::Match) -> Result<MatchParts, MatchError> {
        let strings = |l: &[xsec::StringMatch], what: &'static str| {
            l.iter()
                .enumerate()
                .map(|(index, s)| string_match(s).ok_or(MatchError::NoMatchType { what, index }))
                .collect::<Result<Vec<_>, _>>()
        };
        let accounts = |l: &[xsec::ServiceAccountMatch], what: &'static str| {
            l.iter()
                .enumerate()
                .map(|(index, sa)| {
                    if sa.namespace.is_empty() || sa.service_account.is_empty() {
                        Err(MatchError::ServiceAccount { what, index })
                    } else {
                        Ok(StringMatch::Suffix(format!(
                            "/ns/{}/sa/{}",
                            sa.namespace, sa.service_account
                        )))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let cidrs = |l: &[xsec::Address], what: &'static str| {
            l.iter()
                .enumerate()
                .map(|(index, a)| {
                    let ip = ip_from_bytes(&a.address, &format!("{what}[{index}]"))?;
                    let len = u8::try_from(a.length).unwrap_or(u8::MAX);
                    IpNet::new(ip, len)
                        .map(|n| n.trunc())
                        .map_err(|_| MatchError::PrefixLength {
                            what,
                            index,
                            length: a.length,
                            ip,
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let port_list = |l: &[u32], what: &str| {
            l.iter()
                .enumerate()
                .map(|(i, p)| {
                    port(*p, &format!("{what}[{i}]"), false)
                        .map(PortNumber)
                        .map_err(MatchError::from)
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(MatchParts {
            namespaces: (
                strings(&m.namespaces, "namespaces")?,
                strings(&m.not_namespaces, "not_namespaces")?,
            ),
            principals: (
                strings(&m.principals, "principals")?,
                strings(&m.not_principals, "not_principals")?,
            ),
            accounts: (
                accounts(&m.service_accounts, "service_accounts")?,
                accounts(&m.not_service_accounts, "not_service_accounts")?,
            ),
            source_ips: (
                cidrs(&m.source_ips, "source_ips")?,
                cidrs(&m.not_source_ips, "not_source_ips")?,
            ),
            destination_ips: (
                cidrs(&m.destination_ips, "destination_ips")?,
                cidrs(&m.not_destination_ips, "not_destination_ips")?,
            ),
            ports: (
                port_list(&m.destination_ports, "destination_ports")?,
                port_list(&m.not_destination_ports, "not_destination_ports")?,
            ),
        })
    }

    /// ztunnel skips a match with no field set: it never matches.
    fn is_empty(&self) -> bool {
        both_empty(&self.namespaces)
            && both_empty(&self.principals)
            && both_empty(&self.accounts)
            && both_empty(&self.source_ips)
            && both_empty(&self.destination_ips)
            && both_empty(&self.ports)
    }

    /// The match as one CRD `Source`, if it only tests the source and its principal tests
    /// fit one list (negative lists always merge: "none of A and none of B" is "none of
    /// A ∪ B"; positive ones only if one side is empty).
    fn as_source(&self) -> Option<Source> {
        if !both_empty(&self.destination_ips) || !both_empty(&self.ports) {
            return None;
        }
        if !self.principals.0.is_empty() && !self.accounts.0.is_empty() {
            return None;
        }
        let mut principals = self.principals.0.clone();
        principals.extend(self.accounts.0.iter().cloned());
        let mut not_principals = self.principals.1.clone();
        not_principals.extend(self.accounts.1.iter().cloned());
        Some(Source {
            principals,
            not_principals,
            namespaces: self.namespaces.0.clone(),
            not_namespaces: self.namespaces.1.clone(),
            ip_blocks: self.source_ips.0.iter().map(|n| IpBlock(*n)).collect(),
            not_ip_blocks: self.source_ips.1.iter().map(|n| IpBlock(*n)).collect(),
            ..Source::default()
        })
    }

    /// The match as one CRD `Operation`, if it only tests destination ports.
    fn as_operation(&self) -> Option<Operation> {
        let only_ports = both_empty(&self.namespaces)
            && both_empty(&self.principals)
            && both_empty(&self.accounts)
            && both_empty(&self.source_ips)
            && both_empty(&self.destination_ips);
        only_ports.then(|| Operation {
            ports: self.ports.0.clone(),
            not_ports: self.ports.1.clone(),
            ..Operation::default()
        })
    }

    /// The match as `when` conditions (all must hold), one per field tested.
    fn as_conditions(&self) -> Vec<Condition> {
        fn cond<T: ToString>(
            key: ConditionKey,
            (pos, neg): &(Vec<T>, Vec<T>),
            out: &mut Vec<Condition>,
        ) {
            if pos.is_empty() && neg.is_empty() {
                return;
            }
            let exact = |l: &Vec<T>| {
                l.iter()
                    .map(|v| StringMatch::Exact(v.to_string()))
                    .collect()
            };
            out.push(Condition {
                key,
                values: exact(pos),
                not_values: exact(neg),
            });
        }
        fn matches(
            key: ConditionKey,
            (pos, neg): &(Vec<StringMatch>, Vec<StringMatch>),
            out: &mut Vec<Condition>,
        ) {
            if !pos.is_empty() || !neg.is_empty() {
                out.push(Condition {
                    key,
                    values: pos.clone(),
                    not_values: neg.clone(),
                });
            }
        }
        let mut out = Vec::new();
        matches(ConditionKey::SourceNamespace, &self.namespaces, &mut out);
        matches(ConditionKey::SourcePrincipal, &self.principals, &mut out);
        matches(ConditionKey::SourcePrincipal, &self.accounts, &mut out);
        cond(ConditionKey::SourceIp, &self.source_ips, &mut out);
        cond(ConditionKey::DestinationIp, &self.destination_ips, &mut out);
        let ports = (
            self.ports.0.iter().map(|p| p.0).collect::<Vec<_>>(),
            self.ports.1.iter().map(|p| p.0).collect::<Vec<_>>(),
        );
        cond(ConditionKey::DestinationPort, &ports, &mut out);
        out
    }
}

fn string_match(s: &xsec::StringMatch) -> Option<StringMatch> {
    use xsec::string_match::MatchType;
    Some(match s.match_type.as_ref()? {
        MatchType::Exact(v) => StringMatch::Exact(v.clone()),
        MatchType::Prefix(v) => StringMatch::Prefix(v.clone()),
        MatchType::Suffix(v) => StringMatch::Suffix(v.clone()),
        MatchType::Presence(_) => StringMatch::Any,
    })
}

/// One xDS rule as equivalent CRD rules (OR-ed); empty when it can never match.
fn translate_rule(rule: &xsec::Rule) -> Result<Vec<Rule>, RuleError> {
    // All partial rules share which of from/to are taken: distribution only adds `when`.
    let mut partial = vec![Rule::default()];
    for (ci, clause) in rule.clauses.iter().enumerate() {
        if clause.matches.is_empty() {
            // A clause without matches always matches.
            continue;
        }
        let mut parts = Vec::new();
        for (mi, m) in clause.matches.iter().enumerate() {
            let p = MatchParts::parse(m).map_err(|error| RuleError::Match {
                clause: ci,
                index: mi,
                error,
            })?;
            if !p.is_empty() {
                parts.push(p);
            }
        }
        if parts.is_empty() {
            // Only empty matches: the clause, so the rule, never matches.
            return Ok(Vec::new());
        }
        let from_free = partial[0].from.is_empty();
        let to_free = partial[0].to.is_empty();
        let sources: Option<Vec<Source>> = parts.iter().map(MatchParts::as_source).collect();
        let operations: Option<Vec<Operation>> =
            parts.iter().map(MatchParts::as_operation).collect();
        match (sources, operations) {
            (Some(sources), _) if from_free => {
                for r in &mut partial {
                    r.from = sources
                        .iter()
                        .map(|s| RuleFrom { source: s.clone() })
                        .collect();
                }
            }
            (_, Some(ops)) if to_free => {
                for r in &mut partial {
                    r.to = ops
                        .iter()
                        .map(|o| RuleTo {
                            operation: o.clone(),
                        })
                        .collect();
                }
            }
            _ if parts.len() == 1 => {
                let conds = parts[0].as_conditions();
                for r in &mut partial {
                    r.when.extend(conds.iter().cloned());
                }
            }
            _ => {
                if partial.len() * parts.len() > MAX_RULES_PER_RULE {
                    return Err(RuleError::TooManyRules);
                }
                let mut next = Vec::with_capacity(partial.len() * parts.len());
                for r in &partial {
                    for p in &parts {
                        let mut r = r.clone();
                        r.when.extend(p.as_conditions());
                        next.push(r);
                    }
                }
                partial = next;
            }
        }
    }
    Ok(partial)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{clause, exact, policy, sm};
    use super::*;
    use xsec::string_match::MatchType;

    #[test]
    fn istiod_shaped_rules_map_to_from_to_and_when() {
        // from: [ns1 | sa a in ns2], to: [port 80], when: destination.ip 10.0.0.0/8.
        let rule = xsec::Rule {
            clauses: vec![
                clause(vec![
                    xsec::Match {
                        namespaces: vec![exact("ns1")],
                        ..Default::default()
                    },
                    xsec::Match {
                        service_accounts: vec![xsec::ServiceAccountMatch {
                            namespace: "ns2".into(),
                            service_account: "a".into(),
                        }],
                        not_principals: vec![sm(MatchType::Prefix("evil".into()))],
                        ..Default::default()
                    },
                ]),
                clause(vec![xsec::Match {
                    destination_ports: vec![80],
                    ..Default::default()
                }]),
                clause(vec![xsec::Match {
                    destination_ips: vec![xsec::Address {
                        address: vec![10, 1, 2, 3],
                        length: 8,
                    }],
                    ..Default::default()
                }]),
            ],
        };
        let p = authorization(policy(vec![rule])).unwrap();
        assert_eq!(p.spec.scope, PolicyScope::Namespace);
        assert_eq!(p.spec.rules.len(), 1);
        let r = &p.spec.rules[0];
        assert_eq!(r.from.len(), 2);
        assert_eq!(
            r.from[0].source.namespaces,
            vec![StringMatch::Exact("ns1".into())]
        );
        assert_eq!(
            r.from[1].source.principals,
            vec![StringMatch::Suffix("/ns/ns2/sa/a".into())]
        );
        assert_eq!(
            r.from[1].source.not_principals,
            vec![StringMatch::Prefix("evil".into())]
        );
        assert_eq!(r.to[0].operation.ports, vec![PortNumber(80)]);
        assert_eq!(r.when.len(), 1);
        assert_eq!(r.when[0].key, ConditionKey::DestinationIp);
        assert_eq!(
            r.when[0].values,
            vec![StringMatch::Exact("10.0.0.0/8".into())]
        );
    }

    #[test]
    fn a_clause_that_fits_nowhere_is_distributed_into_rules() {
        // (principal x AND port 1) OR (namespace y): neither a Source nor an Operation.
        let rule = xsec::Rule {
            clauses: vec![clause(vec![
                xsec::Match {
                    principals: vec![exact("td/ns/a/sa/x")],
                    destination_ports: vec![1],
                    ..Default::default()
                },
                xsec::Match {
                    namespaces: vec![exact("y")],
                    ..Default::default()
                },
            ])],
        };
        // Rule with two such clauses would give 4 rules; one gives 2 when-only rules.
        let p = authorization(policy(vec![rule])).unwrap();
        assert_eq!(p.spec.rules.len(), 2);
        assert!(p
            .spec
            .rules
            .iter()
            .all(|r| r.from.is_empty() && r.to.is_empty()));
        let keys: Vec<Vec<String>> = p
            .spec
            .rules
            .iter()
            .map(|r| r.when.iter().map(|c| c.key.to_string()).collect())
            .collect();
        assert_eq!(
            keys,
            vec![
                vec![
                    "source.principal".to_string(),
                    "destination.port".to_string()
                ],
                vec!["source.namespace".to_string()]
            ]
        );
    }

    #[test]
    fn empty_matches_never_match_and_empty_clauses_always_do() {
        let never = xsec::Rule {
            clauses: vec![clause(vec![xsec::Match::default()])],
        };
        let always = xsec::Rule {
            clauses: vec![clause(vec![])],
        };
        let p = authorization(policy(vec![never, always])).unwrap();
        assert_eq!(p.spec.rules, vec![Rule::default()]);
    }

    #[test]
    fn malformed_authorizations_are_refused_with_their_place() {
        let bad_sm = policy(vec![xsec::Rule {
            clauses: vec![clause(vec![xsec::Match {
                principals: vec![xsec::StringMatch { match_type: None }],
                ..Default::default()
            }])],
        }]);
        let e = authorization(bad_sm).unwrap_err().to_string();
        assert!(
            e.contains("ns1/p: rules[0]: clauses[0].matches[0].principals[0]"),
            "{e}"
        );
        let bad_ip = policy(vec![xsec::Rule {
            clauses: vec![clause(vec![xsec::Match {
                source_ips: vec![xsec::Address {
                    address: vec![1, 2, 3],
                    length: 8,
                }],
                ..Default::default()
            }])],
        }]);
        assert!(authorization(bad_ip)
            .unwrap_err()
            .to_string()
            .contains("3 bytes"));
        let mut bad_scope = policy(vec![]);
        bad_scope.scope = 9;
        assert!(authorization(bad_scope)
            .unwrap_err()
            .to_string()
            .contains("unknown scope 9"));
    }
}
