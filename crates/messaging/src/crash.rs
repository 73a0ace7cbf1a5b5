//! [`crash_point!`](crate::crash_point): a crash point of `faults` where the
//! `testing` feature is on, nothing at all where it is off (release builds
//! carry no fault-injection code path).

/// `crash_point!(name)` aborts the process here when `CRASH_POINT` names this
/// point (see `faults`, feature `testing`); `crash_point!(name, condition)`
/// only where `condition` holds. Without the `testing` feature it expands to
/// nothing: neither `name` nor `condition` is evaluated.
#[cfg(feature = "testing")]
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        $crate::faults::crash_point($name)
    };
    ($name:expr, $condition:expr) => {
        if $condition {
            $crate::faults::crash_point($name)
        }
    };
}

/// `crash_point!(name)` aborts the process here when `CRASH_POINT` names this
/// point (see `faults`, feature `testing`); `crash_point!(name, condition)`
/// only where `condition` holds. Without the `testing` feature it expands to
/// nothing: neither `name` nor `condition` is evaluated.
#[cfg(not(feature = "testing"))]
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {};
    ($name:expr, $condition:expr) => {};
}
