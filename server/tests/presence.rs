//! Presence over real QUIC (docs/presence.md): a watcher sees a user go
//! online and, once the grace period has passed, offline with its last-seen
//! time, for a user on another shard and one on its own; a reconnect within
//! the grace does not flap; privacy hides it or shows it to contacts only;
//! a watch past the per-device bound is refused and changes nothing.

mod common;

use common::{user_on_shard, Server};
use iris_client::{Client, PresenceEvent, PresencePrivacy, PresenceState};
use std::time::Duration;

/// Long enough for a reconnect on a loaded two-core machine to land within it.
const GRACE_MS: u64 = 1_000;

fn server() -> Server {
    Server::start_with(2, &[&format!("presence.grace_ms = {GRACE_MS}")])
}

async fn next_change(client: &mut Client) -> (u64, PresenceState) {
    match tokio::time::timeout(Duration::from_secs(10), client.next_presence()).await {
        Ok(Some(PresenceEvent::Changed { user, state })) => (user, state),
        other => panic!("no presence change: {other:?}"),
    }
}

/// Asserts that nothing arrives for `window`.
async fn quiet(client: &mut Client, window: Duration) {
    if let Ok(event) = tokio::time::timeout(window, client.next_presence()).await {
        panic!("unexpected presence event: {event:?}");
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_online_then_offline_with_last_seen_on_both_shards_without_flapping() {
    let server = server();
    let (watcher, remote, local) = (user_on_shard(0, 2, 10), user_on_shard(1, 2, 20), user_on_shard(0, 2, 30));
    let mut a = Client::connect(server.client_config(watcher, 1)).await.unwrap();
    a.watch_presence(vec![remote, local]).await.unwrap();
    // The current state at once: never seen.
    let mut first = vec![next_change(&mut a).await, next_change(&mut a).await];
    first.sort_by_key(|(user, _)| *user);
    let mut expected = vec![
        (remote, PresenceState::Offline { last_seen_ms: None }),
        (local, PresenceState::Offline { last_seen_ms: None }),
    ];
    expected.sort_by_key(|(user, _)| *user);
    assert_eq!(first, expected);

    for user in [remote, local] {
        let client = Client::connect(server.client_config(user, 1)).await.unwrap();
        assert_eq!(next_change(&mut a).await, (user, PresenceState::Online), "user {user}");
        // Offline, with the time its device left. (That it comes only once
        // the grace has passed is the table's rule, checked on a simulated
        // clock in `shard::presence::tests`; a reconnect within the grace
        // causing nothing is checked below.)
        let left = wall_ms();
        client.close().await.unwrap();
        let (who, state) = next_change(&mut a).await;
        assert_eq!(who, user);
        let PresenceState::Offline { last_seen_ms: Some(seen) } = state else { panic!("{state:?}") };
        assert!(seen + 1000 >= left && seen <= wall_ms(), "last seen {seen}, left at {left}");
        // A device back within the grace: no event at all.
        let client = Client::connect(server.client_config(user, 1)).await.unwrap();
        assert_eq!(next_change(&mut a).await, (user, PresenceState::Online));
        client.reconnect().await.unwrap();
        quiet(&mut a, Duration::from_millis(GRACE_MS * 2)).await;
        client.close().await.unwrap();
        assert!(matches!(next_change(&mut a).await, (who, PresenceState::Offline { .. }) if who == user));
    }
    // The watcher's own reconnect (a new connection that may replace the
    // old one before the server sees it go): watched again, current states
    // at once.
    a.reconnect().await.unwrap();
    let mut again = vec![next_change(&mut a).await.0, next_change(&mut a).await.0];
    again.sort_unstable();
    let mut both = vec![remote, local];
    both.sort_unstable();
    assert_eq!(again, both);
    // A device that removes itself goes offline like one that disconnects.
    let leaving = Client::connect(server.client_config(remote, 2)).await.unwrap();
    assert_eq!(next_change(&mut a).await, (remote, PresenceState::Online));
    leaving.remove_device(2).await.unwrap();
    assert!(matches!(next_change(&mut a).await, (who, PresenceState::Offline { .. }) if who == remote));
    a.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_nobody_hides_and_contacts_shows_only_to_users_it_watches() {
    let server = server();
    let (owner, contact, stranger) = (user_on_shard(1, 2, 10), user_on_shard(0, 2, 20), user_on_shard(1, 2, 30));
    let mut b = Client::connect(server.client_config(owner, 1)).await.unwrap();
    let mut c = Client::connect(server.client_config(contact, 1)).await.unwrap();
    let mut s = Client::connect(server.client_config(stranger, 1)).await.unwrap();
    for watcher in [&c, &s] {
        watcher.watch_presence(vec![owner]).await.unwrap();
    }
    assert_eq!(next_change(&mut c).await, (owner, PresenceState::Online));
    assert_eq!(next_change(&mut s).await, (owner, PresenceState::Online));
    b.set_presence_privacy(PresencePrivacy::Nobody).await.unwrap();
    assert_eq!(next_change(&mut c).await, (owner, PresenceState::Hidden));
    assert_eq!(next_change(&mut s).await, (owner, PresenceState::Hidden));
    // Contacts: the owner watches `contact`, which makes it one.
    b.set_presence_privacy(PresencePrivacy::Contacts).await.unwrap();
    quiet(&mut c, Duration::from_millis(300)).await;
    b.watch_presence(vec![contact]).await.unwrap();
    assert_eq!(next_change(&mut b).await, (contact, PresenceState::Online));
    assert_eq!(next_change(&mut c).await, (owner, PresenceState::Online), "a contact sees it");
    quiet(&mut s, Duration::from_millis(300)).await;
    // The owner goes away: only the contact hears it.
    b.close().await.unwrap();
    assert!(
        matches!(next_change(&mut c).await, (who, PresenceState::Offline { last_seen_ms: Some(_) }) if who == owner)
    );
    quiet(&mut s, Duration::from_millis(GRACE_MS * 2)).await;
    c.close().await.unwrap();
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_past_the_bound_is_refused_whole_and_the_session_goes_on() {
    let server = Server::start_with(2, &["presence.subscriptions_per_device_max = 3"]);
    let (watcher, other) = (user_on_shard(0, 2, 10), user_on_shard(1, 2, 20));
    let mut a = Client::connect(server.client_config(watcher, 1)).await.unwrap();
    a.watch_presence(vec![other, 1_000, 1_001, 1_002]).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), a.next_presence()).await {
        Ok(Some(PresenceEvent::Refused(error))) => {
            assert_eq!(error.code(), Some(iris_protocol::ErrorCode::TooManySubscriptions), "{error:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Nothing of it was kept, and the session still serves.
    let _receiver = Client::connect(server.client_config(other, 1)).await.unwrap();
    quiet(&mut a, Duration::from_millis(300)).await;
    a.unwatch_presence(vec![1_000, 1_001, 1_002]).await.unwrap();
    a.watch_presence(vec![other]).await.unwrap();
    assert_eq!(next_change(&mut a).await, (other, PresenceState::Online));
    a.send(other, b"still here".to_vec()).await.unwrap();
    a.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_survives_a_sigkill_and_restart() {
    let mut server = server();
    let (watcher, watched) = (user_on_shard(0, 2, 10), user_on_shard(1, 2, 20));
    let client = Client::connect(server.client_config(watched, 1)).await.unwrap();
    // A session of a few seconds: its start and its end are told apart.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left = wall_ms();
    client.close().await.unwrap();
    // Past the grace, and long enough for the log to have synced the
    // device's session end.
    tokio::time::sleep(Duration::from_millis(GRACE_MS + 500)).await;
    server.kill9();
    server.restart();
    let mut a = Client::connect(server.client_config(watcher, 1)).await.unwrap();
    a.watch_presence(vec![watched]).await.unwrap();
    let (user, state) = next_change(&mut a).await;
    assert_eq!(user, watched);
    let PresenceState::Offline { last_seen_ms: Some(seen) } = state else { panic!("after the restart: {state:?}") };
    // The session's end, to the second (not its start, 3 s earlier).
    assert!(seen + 1_000 >= left && seen <= left + 1_000, "last seen {seen}, left at {left}");
    a.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_only_the_recipients_online_devices_and_is_never_replayed() {
    let server = server();
    let (sender, recipient) = (user_on_shard(0, 2, 10), user_on_shard(1, 2, 20));
    let mut phone = Client::connect(server.client_config(recipient, 1)).await.unwrap();
    // A second device of the recipient, registered and then offline.
    Client::connect(server.client_config(recipient, 2)).await.unwrap().close().await.unwrap();
    let a = Client::connect(server.client_config(sender, 1)).await.unwrap();
    for active in [true, false] {
        a.typing(recipient, active).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), phone.next_presence()).await {
            Ok(Some(PresenceEvent::Typing { from_user, from_device, active: seen })) => {
                assert_eq!((from_user, from_device, seen), (sender, 1, active));
            }
            other => panic!("no typing notice: {other:?}"),
        }
    }
    // The device that was offline hears nothing of it once it connects.
    let mut laptop = Client::connect(server.client_config(recipient, 2)).await.unwrap();
    quiet(&mut laptop, Duration::from_millis(500)).await;
    // Nor the typing device itself when it types to its own user, while its
    // user's other device does; nor a third user.
    let mut second = Client::connect(server.client_config(sender, 2)).await.unwrap();
    let mut stranger = Client::connect(server.client_config(user_on_shard(0, 2, 40), 1)).await.unwrap();
    let mut a = a;
    a.typing(sender, true).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), second.next_presence()).await {
        Ok(Some(PresenceEvent::Typing { from_user, from_device, active })) => {
            assert_eq!((from_user, from_device, active), (sender, 1, true));
        }
        other => panic!("no typing notice on the other device: {other:?}"),
    }
    quiet(&mut a, Duration::from_millis(300)).await;
    quiet(&mut stranger, Duration::from_millis(100)).await;
    for client in [a, phone, laptop, second, stranger] {
        client.close().await.unwrap();
    }
}
