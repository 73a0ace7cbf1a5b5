//! `crash_point!(name)`: a crash point of [`crate::faults`] where the `testing`
//! feature is on, nothing at all where it is off (release builds carry no
//! fault-injection code path).

#[cfg(feature = "testing")]
macro_rules! crash_point {
    ($name:ident) => {
        $crate::faults::crash_point($crate::faults::points::$name)
    };
    ($name:ident if $condition:expr) => {
        if $condition {
            $crate::faults::crash_point($crate::faults::points::$name)
        }
    };
}

#[cfg(not(feature = "testing"))]
macro_rules! crash_point {
    ($name:ident) => {};
    ($name:ident if $condition:expr) => {};
}
