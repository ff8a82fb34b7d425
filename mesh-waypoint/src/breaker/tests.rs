//! Tests of the circuit breakers.

use std::{sync::Arc, time::Duration};

use mesh_cluster::{
    k8s::{parse_documents, ConnectionPool},
    ClusterState, EnrollmentOptions, Service,
};

use super::{Breakers, Overflow};

/// Service `shop/web`.
fn web() -> Arc<Service> {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80, targetPort: 8080}]\n  selector: {app: web}\n";
    let objects = parse_documents("t.yaml", text).expect("parses");
    let state = ClusterState::build(&objects, &EnrollmentOptions::new("n0")).expect("builds");
    Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .expect("web"),
    )
}

fn pool(f: impl FnOnce(&mut ConnectionPool)) -> ConnectionPool {
    let mut pool = ConnectionPool::default();
    f(&mut pool);
    pool
}

#[test]
fn requests_beyond_http2_max_requests_are_refused_and_their_places_come_back() {
    let breakers = Breakers::default();
    let web = web();
    let limited = pool(|p| p.http2_max_requests = Some(2));
    let at = (web.as_ref(), 80, None);
    let request = |at| {
        breakers
            .at(at, &limited)
            .expect("limited")
            .request(&limited)
    };
    let first = request(at).expect("1 of 2");
    let second = request(at).expect("2 of 2");
    assert_eq!(request(at).err(), Some(Overflow::Requests(2)));
    // Another subset and another port are other destinations.
    assert!(request((web.as_ref(), 80, Some("v2"))).is_ok());
    assert!(request((web.as_ref(), 81, None)).is_ok());
    drop(first);
    let third = request(at).expect("a place came back");
    // A policy without limits counts nothing.
    assert!(breakers
        .at(at, &pool(|p| p.idle_timeout = Some(Duration::from_secs(1))))
        .is_none());
    drop((second, third));
}

#[test]
fn retries_beyond_max_retries_are_not_made() {
    let breakers = Breakers::default();
    let web = web();
    let limited = pool(|p| p.max_retries = Some(1));
    let at = (web.as_ref(), 80, None);
    let retrying = breakers.retry(at, &limited).expect("the first retry");
    assert!(retrying.is_some(), "counted");
    assert_eq!(
        breakers.retry(at, &limited).err(),
        Some(Overflow::Retries(1)),
        "one in flight"
    );
    drop(retrying);
    assert!(breakers.retry(at, &limited).is_ok(), "none in flight again");
    // No `maxRetries`, even with other limits or settings: retries are not limited (before,
    // any `connectionPool` without `maxRetries` stopped every retry).
    for pool in [
        ConnectionPool::default(),
        pool(|p| p.http2_max_requests = Some(1)),
        pool(|p| p.idle_timeout = Some(Duration::from_secs(1))),
    ] {
        assert!(matches!(breakers.retry(at, &pool), Ok(None)), "{pool:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn requests_wait_for_a_connection_as_http1_max_pending_requests_allows() {
    let breakers = Arc::new(Breakers::default());
    let web = web();
    // Istio's circuit-breaking task: one connection, one request waiting.
    let limited = Arc::new(pool(|p| {
        p.max_connections = Some(1);
        p.http1_max_pending_requests = Some(1);
    }));
    let endpoint = "10.0.0.1:8080".parse().unwrap();
    let at = (web.as_ref(), 80, None);
    let held = breakers
        .at(at, &limited)
        .unwrap()
        .connection(&limited, endpoint, true)
        .await
        .expect("the one connection")
        .expect("counted");
    // The second waits...
    let waiting = {
        let (breakers, web, limited) = (
            Arc::clone(&breakers),
            Arc::clone(&web),
            Arc::clone(&limited),
        );
        tokio::spawn(async move {
            breakers
                .at((web.as_ref(), 80, None), &limited)
                .unwrap()
                .connection(&limited, endpoint, true)
                .await
                .map(|slot| slot.is_some())
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        !waiting.is_finished(),
        "waits while the connection is in use"
    );
    // ...the third finds the queue full.
    assert_eq!(
        breakers
            .at(at, &limited)
            .unwrap()
            .connection(&limited, endpoint, true)
            .await
            .err(),
        Some(Overflow::Connections(1, 1))
    );
    // A tunnel does not wait at all.
    assert_eq!(
        breakers
            .at(at, &limited)
            .unwrap()
            .connection(&limited, endpoint, false)
            .await
            .err(),
        Some(Overflow::Connections(1, 0))
    );
    // An endpoint without a connection in use may have one (as Envoy's pools open their first).
    let other = "10.0.0.2:8080".parse().unwrap();
    let elsewhere = breakers
        .at(at, &limited)
        .unwrap()
        .connection(&limited, other, false)
        .await
        .expect("its first connection");
    // The connection freed: the waiting request gets it.
    drop(held);
    assert_eq!(waiting.await.unwrap(), Ok(true));
    drop(elsewhere);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_gives_up_waiting_leaves_the_queue() {
    let breakers = Breakers::default();
    let web = web();
    let limited = pool(|p| {
        p.max_connections = Some(1);
        p.http1_max_pending_requests = Some(1);
    });
    let endpoint = "10.0.0.1:8080".parse().unwrap();
    let at = (web.as_ref(), 80, None);
    let _held = breakers
        .at(at, &limited)
        .unwrap()
        .connection(&limited, endpoint, true)
        .await;
    // A request times out while waiting (its route's timeout)...
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        breakers
            .at(at, &limited)
            .unwrap()
            .connection(&limited, endpoint, true),
    )
    .await;
    assert!(gave_up.is_err());
    // ...and its place in the queue is free for the next.
    let next = tokio::time::timeout(
        Duration::from_secs(1),
        breakers
            .at(at, &limited)
            .unwrap()
            .connection(&limited, endpoint, true),
    )
    .await;
    assert!(
        next.is_err(),
        "waits (not refused): the queue has room again"
    );
}

#[test]
fn idle_destinations_are_let_go_and_those_in_use_kept() {
    let breakers = Breakers::default();
    let web = web();
    let limited = pool(|p| p.http2_max_requests = Some(2));
    let held = breakers
        .at((web.as_ref(), 80, None), &limited)
        .expect("limited")
        .request(&limited)
        .expect("a place");
    let _ = breakers
        .at((web.as_ref(), 81, None), &limited)
        .expect("limited")
        .request(&limited)
        .expect("a place");
    assert_eq!(breakers.kept(), 2);
    breakers.forget_idle();
    assert_eq!(breakers.kept(), 1, "port 80 has a request in flight");
    // Its count is the one in use: one more place of two, then none.
    let again = breakers
        .at((web.as_ref(), 80, None), &limited)
        .expect("limited");
    let second = again.request(&limited).expect("the second place");
    assert_eq!(again.request(&limited).err(), Some(Overflow::Requests(2)));
    drop((held, second));
    breakers.forget_idle();
    drop(again);
    breakers.forget_idle();
    assert_eq!(breakers.kept(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_http2_request_opens_a_connection_within_max_connections_else_waits_for_room() {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::H2Place;

    let breakers = Arc::new(Breakers::default());
    let web = web();
    let limited = Arc::new(pool(|p| {
        p.max_connections = Some(1);
        p.http1_max_pending_requests = Some(1);
        p.max_concurrent_streams = Some(1);
    }));
    let (a, b): (std::net::SocketAddr, std::net::SocketAddr) = (
        "10.0.0.1:8080".parse().unwrap(),
        "10.0.0.2:8080".parse().unwrap(),
    );
    let at = (web.as_ref(), 80, None);
    let breaker = breakers.at(at, &limited).unwrap();
    let open = |place: H2Place| match place {
        H2Place::Open(slot) => slot.expect("counted"),
        H2Place::Room => panic!("room, not a connection"),
    };
    // Each endpoint may have its first connection; the destination's one is taken then.
    let first_a = open(breaker.h2_connection(&limited, a, || false).await.unwrap());
    let first_b = open(breaker.h2_connection(&limited, b, || false).await.unwrap());
    // A second to `a` waits, as the one request allowed to...
    let room = Arc::new(AtomicBool::new(false));
    let waiting = {
        let (breakers, web, limited, room) = (
            Arc::clone(&breakers),
            Arc::clone(&web),
            Arc::clone(&limited),
            Arc::clone(&room),
        );
        tokio::spawn(async move {
            let breaker = breakers.at((web.as_ref(), 80, None), &limited).unwrap();
            matches!(
                breaker
                    .h2_connection(&limited, a, || room.load(Ordering::Acquire))
                    .await,
                Ok(H2Place::Room)
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    // ...so a third is refused at once.
    assert_eq!(
        breaker.h2_connection(&limited, a, || false).await.err(),
        Some(Overflow::Connections(1, 1))
    );
    // A request on `a`'s connection ends: the one waiting finds room there.
    room.store(true, Ordering::Release);
    breaker.room_signal().notify_waiters();
    assert!(waiting.await.unwrap(), "room on the kept connection");
    // Without `maxConnections`, nothing is counted.
    let unlimited = pool(|p| p.max_concurrent_streams = Some(1));
    let requests = pool(|p| {
        p.max_concurrent_streams = Some(1);
        p.http2_max_requests = Some(10);
    });
    let breaker = breakers.at(at, &requests).unwrap();
    assert!(matches!(
        breaker.h2_connection(&unlimited, a, || false).await,
        Ok(H2Place::Open(None))
    ));
    drop((first_a, first_b));
}

#[test]
fn changed_settings_count_afresh_and_the_same_settings_keep_their_counts() {
    let breakers = Breakers::default();
    let web = web();
    let at = (web.as_ref(), 80, None);
    let one = pool(|p| p.http2_max_requests = Some(1));
    let held = breakers
        .at(at, &one)
        .unwrap()
        .request(&one)
        .expect("the one place");
    // The same settings, read again from a new view: the same counts.
    let again = one.clone();
    assert_eq!(
        breakers.at(at, &again).unwrap().request(&again).err(),
        Some(Overflow::Requests(1))
    );
    // Changed settings: a new destination's counts, as Envoy's new cluster.
    let changed = pool(|p| {
        p.http2_max_requests = Some(1);
        p.max_connections = Some(4);
    });
    assert!(breakers.at(at, &changed).unwrap().request(&changed).is_ok());
    drop(held);
}
