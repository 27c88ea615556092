//! Run a handful of child requests at once on the current task.
//!
//! The futures borrow the driver, so they cannot be spawned; polling them
//! together from one future keeps every child busy at the same time.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;

/// Poll every future until all are done; results come in input order.
pub(crate) async fn join_all<T>(futs: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut pending: Vec<Option<_>> = futs.into_iter().map(Some).collect();
    let mut done: Vec<Option<T>> = pending.iter().map(|_| None).collect();
    poll_fn(move |cx| {
        let mut busy = false;
        for (slot, out) in pending.iter_mut().zip(done.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => busy = true,
                }
            }
        }
        if busy {
            Poll::Pending
        } else {
            Poll::Ready(done.iter_mut().filter_map(Option::take).collect())
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_join_all_runs_concurrently_and_keeps_order() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        // The first future waits for the second: only concurrent polling ends.
        let a: Pin<Box<dyn Future<Output = u32> + Send>> =
            Box::pin(async move { rx.await.unwrap() + 1 });
        let b: Pin<Box<dyn Future<Output = u32> + Send>> = Box::pin(async move {
            tx.send(41).unwrap();
            7
        });
        assert_eq!(join_all(vec![a, b]).await, vec![42, 7]);
    }

    #[tokio::test]
    async fn test_join_all_empty_returns_empty() {
        let v: Vec<Pin<Box<dyn Future<Output = u8> + Send>>> = Vec::new();
        assert!(join_all(v).await.is_empty());
    }
}
