// Broker-level error codes: what the HTTP layer turns into a status (broker/api/http_errors.cpp
// is the one place that maps codes to statuses).
#pragma once

#include <system_error>

namespace broker {

enum class errc {
  ok = 0,
  invalid_argument,  // 400: a request field is wrong (Error::field names it)
  not_found,         // 404: no such domain, drive, disk, NIC
  already_exists,    // 409: a domain or device with that id exists
  busy,              // 409: the domain is running another job
  wrong_state,       // 409: e.g. resume a running domain, save a domain that is not running
  tray_locked,       // 409: the guest holds the CD tray locked; retry with force
  guest_timeout,     // 504: the guest did not acknowledge (unplug), nothing was removed
  qemu_timeout,      // 504: QEMU did not answer in time
  qemu_error,        // 502: QEMU refused (Error::qmp_class/qmp_desc say why)
  qemu_gone,         // 502: the domain's QEMU exited
  not_implemented,   // 501: the route exists, the flow does not yet
  forbidden,         // 403: e.g. fd commands through the QMP passthrough
  cancelled,         // 409: the job was cancelled (DELETE /v1/domains/{name}/job)
  internal,          // 500
};
// How many enumerators errc has: they run from 0 to the one named here, which must stay the
// last (tests/api/http_errors_test.cpp fails to compile otherwise).
inline constexpr int kErrcCount = static_cast<int>(errc::internal) + 1;

const std::error_category& category() noexcept;
inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), category()}; }

}  // namespace broker

template <>
struct std::is_error_code_enum<broker::errc> : std::true_type {};
