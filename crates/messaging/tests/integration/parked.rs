//! The operator's view of parked outbox rows.

use messaging::parked::{self, ParkedError, Rows};

use crate::support;

#[tokio::test(flavor = "multi_thread")]
async fn parked_rows_are_listed_retried_and_discarded_and_an_unknown_id_changes_nothing() {
    let db = support::database().await;
    let mut ids = Vec::new();
    for key in ["a", "b", "c"] {
        ids.push(support::commit_event(&db.pool, "shop.nowhere", key).await);
    }
    let fresh = support::commit_event(&db.pool, "shop.events", "d").await;
    sqlx::query(
        "UPDATE outbox SET parked_at = now(), failures = 10, last_error = 'refused'
         WHERE id = ANY($1)",
    )
    .bind(&ids)
    .execute(&db.pool)
    .await
    .expect("park");

    let listed = parked::list(&db.pool, 100).await.expect("list");
    assert_eq!(
        listed.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids,
        "oldest first"
    );
    assert_eq!(listed[0].last_error.as_deref(), Some("refused"));
    assert_eq!((listed[0].failures, listed[0].size), (10, 16));

    // One id that is not parked: nothing changes.
    let mixed = parked::retry(&db.pool, &Rows::Ids(vec![ids[0], fresh])).await;
    assert!(
        matches!(&mixed, Err(ParkedError::NotParked { ids }) if ids == &[fresh]),
        "{mixed:?}"
    );
    assert_eq!(parked::list(&db.pool, 100).await.expect("list").len(), 3);

    let retried = parked::retry(&db.pool, &Rows::Ids(vec![ids[0]]))
        .await
        .expect("retry");
    assert_eq!(retried, vec![ids[0]]);
    let (failures, parked_at): (i32, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT failures, parked_at FROM outbox WHERE id = $1")
            .bind(ids[0])
            .fetch_one(&db.pool)
            .await
            .expect("row");
    assert_eq!(
        (failures, parked_at),
        (0, None),
        "back in the relay's stream"
    );

    let discarded = parked::discard(&db.pool, &Rows::Ids(vec![ids[1]]))
        .await
        .expect("discard");
    assert_eq!(discarded, vec![ids[1]]);
    assert_eq!(
        parked::list(&db.pool, 100)
            .await
            .expect("list")
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        vec![ids[2]]
    );
    let again = parked::retry(&db.pool, &Rows::Ids(vec![ids[1]])).await;
    assert!(
        matches!(again, Err(ParkedError::NotParked { .. })),
        "a discarded row is not retried"
    );
    let kept: bool = sqlx::query_scalar(
        "SELECT discarded_at IS NOT NULL AND published_at IS NULL FROM outbox WHERE id = $1",
    )
    .bind(ids[1])
    .fetch_one(&db.pool)
    .await
    .expect("kept");
    assert!(kept, "a discarded row stays, marked");
    let all = parked::discard(&db.pool, &Rows::All)
        .await
        .expect("discard all");
    assert_eq!(all, vec![ids[2]]);
    assert!(parked::list(&db.pool, 100).await.expect("list").is_empty());
    db.drop_db().await;
}
