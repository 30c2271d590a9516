//! Tests of [`JwksCache`]: configuration errors named by policy, key sets fetched over HTTPS
//! (cached, refetched for an unknown `kid` within the rate limit, kept when a refresh fails,
//! bounded by the rule's timeout and the size limit), the refresher, OpenID discovery, and
//! redirects.

use std::sync::atomic::Ordering;

use http::request::Parts;
use jsonwebtoken::{Algorithm, Header};

use super::super::test_support::*;
use super::super::{AuthnResult, JwtAuthenticator};
use super::*;

#[test]
fn bad_policies_are_reported_by_name() {
    let jwks = cache();
    let bad_inline = JwtRule {
        issuer: ISS.into(),
        jwks: Some("{\"keys\": 3}".into()),
        ..Default::default()
    };
    let oct_only = JwtRule {
        issuer: ISS.into(),
        jwks: Some(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into()),
        ..Default::default()
    };
    let bad_timeout = JwtRule {
        issuer: ISS.into(),
        jwks_uri: Some("https://127.0.0.1:1/jwks".into()),
        timeout: Some("soon".into()),
        ..Default::default()
    };
    // Neither jwks nor jwksUri: discovered from an issuer that is a URL (ISS), refused for
    // one that is not (ISS_B).
    let discovered = JwtRule {
        issuer: ISS.into(),
        ..Default::default()
    };
    let no_source = JwtRule {
        issuer: ISS_B.into(),
        ..Default::default()
    };
    let errors = jwks
        .update(&[
            policy("good", vec![rule(ISS)]),
            policy("bad-inline", vec![bad_inline.clone()]),
            policy("oct-only", vec![oct_only]),
            policy("bad-timeout", vec![bad_timeout]),
            policy("no-source", vec![no_source]),
            policy("discovered", vec![discovered]),
        ])
        .unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 4, "{text:#?}");
    assert!(text[0].contains("ns/bad-inline") && text[0].contains("inline jwks"));
    assert!(text[1].contains("ns/oct-only") && text[1].contains("symmetric"));
    assert!(text[2].contains("ns/bad-timeout") && text[2].contains("soon"));
    assert!(
        text[3].contains("ns/no-source")
            && text[3].contains("neither jwks nor jwksUri")
            && text[3].contains("OpenID discovery"),
        "{}",
        text[3]
    );
    let p = policy("bad-inline", vec![bad_inline]);
    let err = JwtAuthenticator::for_policies(&[&p], jwks).unwrap_err();
    assert!(err
        .to_string()
        .contains("RequestAuthentication ns/bad-inline"));
}

#[tokio::test]
async fn jwks_is_fetched_over_https_once_and_cached() {
    bounded(async {
        let k = keys();
        let server = JwksServer::start(jwks_of(&[k.get(Algorithm::RS256)])).await;
        let jwks = server.cache(Duration::ZERO);
        let a = JwtAuthenticator::new(vec![server.rule()], jwks.clone()).unwrap();
        let req = bearer(&rs256(&claims(ISS)));
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!(server.hits(), 1);
        assert!(valid(&a.authenticate(&req).await));
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!(server.hits(), 1, "keys are cached");
        // Another authenticator of the same jwksUri shares the keys.
        let b = JwtAuthenticator::new(vec![server.rule()], jwks.clone()).unwrap();
        assert!(valid(&b.authenticate(&req).await));
        assert_eq!(server.hits(), 1);
        assert_eq!(jwks.fetch_count(), 1);
    })
    .await
}

#[tokio::test]
async fn unknown_kid_triggers_a_refetch() {
    bounded(async {
        let k = keys();
        let server = JwksServer::start(jwks_of(&[k.get(Algorithm::RS256)])).await;
        let a = JwtAuthenticator::new(vec![server.rule()], server.cache(Duration::ZERO)).unwrap();
        assert!(valid(&a.authenticate(&bearer(&rs256(&claims(ISS)))).await));
        // The issuer rotates to a new key.
        let rotated = ec_test_key(Algorithm::ES256, "rotated");
        let token = sign(&rotated, &claims(ISS));
        server.serve(jwks_of(&[k.get(Algorithm::RS256), &rotated]));
        assert!(valid(&a.authenticate(&bearer(&token)).await));
        assert_eq!(server.hits(), 2);
        // A kid nobody publishes refetches once per request (rate limit zero here) and fails.
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("never".into());
        let forged = jsonwebtoken::encode(&h, &claims(ISS), &rotated.enc).unwrap();
        let r = a.authenticate(&bearer(&forged)).await;
        assert!(
            matches!(&r, AuthnResult::Invalid(m) if m.contains("kid")),
            "{r:?}"
        );
        assert_eq!(server.hits(), 3);
    })
    .await
}

#[tokio::test]
async fn unknown_kid_refetches_are_rate_limited() {
    bounded(async {
        let k = keys();
        let server = JwksServer::start(jwks_of(&[k.get(Algorithm::RS256)])).await;
        let a = JwtAuthenticator::new(vec![server.rule()], server.cache(Duration::from_secs(600)))
            .unwrap();
        assert!(valid(&a.authenticate(&bearer(&rs256(&claims(ISS)))).await));
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("never".into());
        let forged = jsonwebtoken::encode(&h, &claims(ISS), &k.get(Algorithm::RS256).enc).unwrap();
        for _ in 0..5 {
            let r = a.authenticate(&bearer(&forged)).await;
            assert!(matches!(r, AuthnResult::Invalid(_)));
        }
        assert_eq!(server.hits(), 1, "the first fetch was just now: no refetch");
    })
    .await
}

#[tokio::test]
async fn keys_are_kept_when_a_refresh_gets_garbage_or_no_answer() {
    bounded(async {
        let k = keys();
        let server = JwksServer::start(jwks_of(&[k.get(Algorithm::RS256)])).await;
        let jwks = server.cache(Duration::ZERO);
        let a = JwtAuthenticator::new(vec![server.rule()], jwks.clone()).unwrap();
        let req = bearer(&rs256(&claims(ISS)));
        assert!(valid(&a.authenticate(&req).await));

        server.serve("<html>oops</html>".into());
        jwks.refresh_all().await;
        assert_eq!(server.hits(), 2);
        assert!(
            valid(&a.authenticate(&req).await),
            "garbage keeps the old keys"
        );

        server.serve(r#"{"keys": []}"#.into());
        jwks.refresh_all().await;
        assert!(
            valid(&a.authenticate(&req).await),
            "an empty set keeps the old keys"
        );

        server.task.abort();
        let _ = (&mut { server.task }).await;
        jwks.refresh_all().await;
        assert!(
            valid(&a.authenticate(&req).await),
            "no server keeps the old keys"
        );
    })
    .await
}

#[tokio::test]
async fn tokens_are_invalid_while_keys_were_never_fetched() {
    bounded(async {
        let server = JwksServer::start("not json".into()).await;
        let a = JwtAuthenticator::new(vec![server.rule()], server.cache(Duration::ZERO)).unwrap();
        let r = a.authenticate(&bearer(&rs256(&claims(ISS)))).await;
        assert!(
            matches!(&r, AuthnResult::Invalid(m) if m.contains("no keys")),
            "{r:?}"
        );
        // Untrusted certificate: a cache without the extra CA cannot fetch either.
        server.serve(jwks_of(&[keys().get(Algorithm::RS256)]));
        let untrusted = cache();
        let b = JwtAuthenticator::new(vec![server.rule()], untrusted).unwrap();
        let r = b.authenticate(&bearer(&rs256(&claims(ISS)))).await;
        assert!(matches!(r, AuthnResult::Invalid(_)), "{r:?}");
        // The trusted one recovers on the next request.
        assert!(valid(&a.authenticate(&bearer(&rs256(&claims(ISS)))).await));
    })
    .await
}

#[tokio::test]
async fn a_silent_jwks_server_is_bounded_by_the_rule_timeout() {
    bounded(async {
        // Accepts TCP and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let jwks = cache();
        let rule = JwtRule {
            issuer: ISS.into(),
            jwks_uri: Some(format!("https://127.0.0.1:{port}/jwks")),
            timeout: Some("300ms".into()),
            ..Default::default()
        };
        let a = JwtAuthenticator::new(vec![rule], jwks).unwrap();
        let req = bearer(&rs256(&claims(ISS)));
        let started = std::time::Instant::now();
        let r = a.authenticate(&req).await;
        assert!(matches!(r, AuthnResult::Invalid(_)));
        assert!(started.elapsed() < Duration::from_secs(3));
        hold.abort();
    })
    .await
}

#[tokio::test]
async fn the_refresher_fetches_new_sources_and_stops_on_shutdown() {
    bounded(async {
        let server = JwksServer::start(jwks_of(&[keys().get(Algorithm::RS256)])).await;
        let jwks = server.cache(Duration::from_secs(600));
        let shutdown = CancellationToken::new();
        let refresher = jwks.spawn_refresher(shutdown.clone());
        jwks.update(&[policy("remote", vec![server.rule()])])
            .unwrap();
        while server.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let a = JwtAuthenticator::new(vec![server.rule()], jwks.clone()).unwrap();
        assert!(valid(&a.authenticate(&bearer(&rs256(&claims(ISS)))).await));
        assert_eq!(server.hits(), 1, "the request used the prefetched keys");
        shutdown.cancel();
        refresher.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn an_oversized_jwks_is_refused_and_a_good_one_later_is_used() {
    bounded(async {
        let k = keys();
        let good = jwks_of(&[k.get(Algorithm::RS256)]);
        // Over the 1 MiB limit (padding the valid document, so only its size is wrong).
        let big = format!("{{\"pad\":\"{}\",{}", "x".repeat(1_100_000), &good[1..]);
        let server = JwksServer::start(big).await;
        let a = JwtAuthenticator::new(vec![server.rule()], server.cache(Duration::ZERO)).unwrap();
        let req = bearer(&rs256(&claims(ISS)));
        let r = a.authenticate(&req).await;
        assert!(matches!(r, AuthnResult::Invalid(_)), "{r:?}");
        server.serve(good);
        assert!(valid(&a.authenticate(&req).await));
    })
    .await
}

/// A server publishing an OpenID configuration and an RS256 key set; an authenticator whose
/// rule discovers them; a request with a token of that issuer.
async fn discovering() -> (JwksServer, Arc<JwksCache>, JwtAuthenticator, Parts) {
    let server = JwksServer::start(jwks_of(&[keys().get(Algorithm::RS256)])).await;
    let jwks = server.cache(Duration::ZERO);
    let a = JwtAuthenticator::new(vec![server.discovered_rule()], jwks.clone()).unwrap();
    let req = bearer(&rs256(&claims(&server.issuer())));
    (server, jwks, a, req)
}

#[tokio::test]
async fn without_jwks_or_jwks_uri_the_keys_are_found_by_openid_discovery() {
    bounded(async {
        // The issuer's trailing slash is dropped before the well-known path, as istiod does.
        let (server, jwks, a, req) = discovering().await;
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!((server.config_hits(), server.hits()), (1, 1));
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!(
            (server.config_hits(), server.hits()),
            (1, 1),
            "keys are cached"
        );
        // The configuration is read again on every fetch: a moved key set is followed.
        let moved = ec_test_key(Algorithm::ES256, "moved");
        server.serve(jwks_of(&[&moved]));
        *server.jwks_path.lock().unwrap() = "/elsewhere/keys".to_string();
        *server.config.lock().unwrap() = format!(
            r#"{{"jwks_uri":"https://127.0.0.1:{}/elsewhere/keys"}}"#,
            server.addr.port()
        );
        jwks.refresh_all().await;
        assert_eq!((server.config_hits(), server.hits()), (2, 2));
        assert!(valid(
            &a.authenticate(&bearer(&sign(&moved, &claims(&server.issuer()))))
                .await
        ));
    })
    .await
}

#[tokio::test]
async fn a_bad_openid_configuration_keeps_the_keys_in_force_and_no_keys_fail_closed() {
    bounded(async {
        let (server, jwks, a, req) = discovering().await;
        assert!(valid(&a.authenticate(&req).await));
        for (i, bad) in [
            "not json",
            r#"{"issuer":"x"}"#,
            r#"{"jwks_uri":42}"#,
            r#"{"jwks_uri":"/relative/keys"}"#,
        ]
        .into_iter()
        .enumerate()
        {
            *server.config.lock().unwrap() = bad.to_string();
            jwks.refresh_all().await;
            assert_eq!(server.config_hits(), 2 + i, "{bad}: not read again");
            assert!(
                valid(&a.authenticate(&req).await),
                "{bad}: the keys in force were lost"
            );
        }
        assert_eq!(
            server.hits(),
            1,
            "a key set was fetched from a bad configuration"
        );
        // A fresh cache that never got keys: tokens are invalid (fail closed).
        let fresh = server.cache(Duration::ZERO);
        let b = JwtAuthenticator::new(vec![server.discovered_rule()], fresh).unwrap();
        let r = b.authenticate(&req).await;
        assert!(
            matches!(&r, AuthnResult::Invalid(m) if m.contains("no keys")),
            "{r:?}"
        );
    })
    .await
}

#[test]
fn the_jwks_uri_of_an_openid_configuration_is_checked() {
    let ok = jwks_uri_of(r#"{"issuer":"i","jwks_uri":"https://idp.example/keys"}"#).unwrap();
    assert_eq!(ok.to_string(), "https://idp.example/keys");
    for (doc, why) in [
        ("<html>", "not JSON"),
        ("{}", "no jwks_uri"),
        (r#"{"jwks_uri":["https://a/k"]}"#, "not a string"),
        (r#"{"jwks_uri":"keys.json"}"#, "not an absolute http(s) URI"),
        (
            r#"{"jwks_uri":"ftp://idp.example/keys"}"#,
            "not an absolute http(s) URI",
        ),
    ] {
        let err = jwks_uri_of(doc).unwrap_err();
        assert!(err.to_string().contains(why), "{doc}: {err}");
    }
}

#[tokio::test]
async fn jwks_redirects_are_followed_as_istiod_does_and_a_loop_ends() {
    bounded(async {
        let server = JwksServer::start(jwks_of(&[keys().get(Algorithm::RS256)])).await;
        let at = |path: &str| JwtRule {
            jwks_uri: Some(format!("https://127.0.0.1:{}{path}", server.addr.port())),
            ..server.rule()
        };
        let req = bearer(&rs256(&claims(ISS)));
        let a = JwtAuthenticator::new(vec![at("/redirect")], server.cache(Duration::ZERO)).unwrap();
        assert!(valid(&a.authenticate(&req).await));
        assert_eq!(server.hits(), 1);
        // A redirect loop ends (10 at most): no keys, so tokens fail closed.
        let b = JwtAuthenticator::new(vec![at("/loop")], server.cache(Duration::ZERO)).unwrap();
        let r = b.authenticate(&req).await;
        assert!(
            matches!(&r, AuthnResult::Invalid(m) if m.contains("no keys")),
            "{r:?}"
        );
        // The first request and 10 redirects, as istiod's client: the limit ended it, not the
        // rule's timeout.
        assert_eq!(server.loop_hits.load(Ordering::SeqCst), 11);
    })
    .await
}
