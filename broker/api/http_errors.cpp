#include "broker/api/http_errors.hpp"

#include <cerrno>
#include <cstring>

#include "broker/api/errc.hpp"
#include "broker/core/errc.hpp"
#include "broker/lifecycle/errc.hpp"
#include "fdpass/errc.hpp"
#include "qmp/error.hpp"

namespace broker::api {
namespace {

using http_status = boost::beast::http::status;

// Each switch lists every enumerator and has no default, so -Wswitch (an error with QB_WERROR)
// flags a new code that nobody mapped.

ErrorClass of(broker::errc e) {
  using E = broker::errc;
  switch (e) {
    case E::ok:
      return {http_status::ok, "ok"};
    case E::invalid_argument:
      return {http_status::bad_request, "invalid_argument"};
    case E::not_found:
      return {http_status::not_found, "not_found"};
    case E::already_exists:
      return {http_status::conflict, "already_exists"};
    case E::busy:
      return {http_status::conflict, "busy"};
    case E::wrong_state:
      return {http_status::conflict, "wrong_state"};
    case E::tray_locked:
      return {http_status::conflict, "tray_locked"};
    case E::guest_timeout:
      return {http_status::gateway_timeout, "guest_timeout"};
    case E::qemu_timeout:
      return {http_status::gateway_timeout, "qemu_timeout"};
    case E::qemu_error:
      return {http_status::bad_gateway, "qemu_error"};
    case E::qemu_gone:
      return {http_status::bad_gateway, "qemu_gone"};
    case E::not_implemented:
      return {http_status::not_implemented, "not_implemented"};
    case E::forbidden:
      return {http_status::forbidden, "forbidden"};
    case E::cancelled:
      return {http_status::conflict, "cancelled"};
    case E::internal:
      return {http_status::internal_server_error, "internal"};
  }
  return {http_status::internal_server_error, "unmapped"};
}

ErrorClass of(lifecycle::errc e) {
  using E = lifecycle::errc;
  switch (e) {
    case E::ok:
      return {http_status::ok, "ok"};
    case E::invalid_spec:
      return {http_status::bad_request, "invalid_spec"};
    // A configuration fault of the daemon, not of the request.
    case E::invalid_uid_range:
      return {http_status::internal_server_error, "invalid_uid_range"};
    // Capacity: retrying later (after a destroy) can succeed.
    case E::uid_exhausted:
      return {http_status::service_unavailable, "uid_exhausted"};
    case E::uid_quarantined:
      return {http_status::service_unavailable, "uid_quarantined"};
    case E::kill_failed:
      return {http_status::internal_server_error, "kill_failed"};
    case E::survivors:
      return {http_status::internal_server_error, "survivors"};
    // The broker could not build the jail or start QEMU: never the request's fault.
    case E::step_clone:
      return {http_status::internal_server_error, "step_clone"};
    case E::step_lift_fds:
      return {http_status::internal_server_error, "step_lift_fds"};
    case E::step_close_range:
      return {http_status::internal_server_error, "step_close_range"};
    case E::step_open_null:
      return {http_status::internal_server_error, "step_open_null"};
    case E::step_dup_stdio:
      return {http_status::internal_server_error, "step_dup_stdio"};
    case E::step_dup_pass:
      return {http_status::internal_server_error, "step_dup_pass"};
    case E::step_mount_private:
      return {http_status::internal_server_error, "step_mount_private"};
    case E::step_mount_tmpfs:
      return {http_status::internal_server_error, "step_mount_tmpfs"};
    case E::step_mkdir:
      return {http_status::internal_server_error, "step_mkdir"};
    case E::step_create_file:
      return {http_status::internal_server_error, "step_create_file"};
    case E::step_bind_ro:
      return {http_status::internal_server_error, "step_bind_ro"};
    case E::step_remount_bind_ro:
      return {http_status::internal_server_error, "step_remount_bind_ro"};
    case E::step_bind_dev:
      return {http_status::internal_server_error, "step_bind_dev"};
    case E::step_remount_bind_dev:
      return {http_status::internal_server_error, "step_remount_bind_dev"};
    case E::step_symlink:
      return {http_status::internal_server_error, "step_symlink"};
    case E::step_move_mount:
      return {http_status::internal_server_error, "step_move_mount"};
    case E::step_remount_root_ro:
      return {http_status::internal_server_error, "step_remount_root_ro"};
    case E::step_chdir_jail:
      return {http_status::internal_server_error, "step_chdir_jail"};
    case E::step_pivot_root:
      return {http_status::internal_server_error, "step_pivot_root"};
    case E::step_umount_old_root:
      return {http_status::internal_server_error, "step_umount_old_root"};
    case E::step_chdir_root:
      return {http_status::internal_server_error, "step_chdir_root"};
    case E::step_open_jail_null:
      return {http_status::internal_server_error, "step_open_jail_null"};
    case E::step_dup_jail_null:
      return {http_status::internal_server_error, "step_dup_jail_null"};
    case E::step_setrlimit_fsize:
      return {http_status::internal_server_error, "step_setrlimit_fsize"};
    case E::step_setrlimit_core:
      return {http_status::internal_server_error, "step_setrlimit_core"};
    case E::step_setrlimit_msgqueue:
      return {http_status::internal_server_error, "step_setrlimit_msgqueue"};
    case E::step_setrlimit_locks:
      return {http_status::internal_server_error, "step_setrlimit_locks"};
    case E::step_setrlimit_memlock:
      return {http_status::internal_server_error, "step_setrlimit_memlock"};
    case E::step_setrlimit_nproc:
      return {http_status::internal_server_error, "step_setrlimit_nproc"};
    case E::step_setrlimit_nofile:
      return {http_status::internal_server_error, "step_setrlimit_nofile"};
    case E::step_cgroup_namespace:
      return {http_status::internal_server_error, "step_cgroup_namespace"};
    case E::step_drop_bounding:
      return {http_status::internal_server_error, "step_drop_bounding"};
    case E::step_clear_ambient:
      return {http_status::internal_server_error, "step_clear_ambient"};
    case E::step_clear_inheritable:
      return {http_status::internal_server_error, "step_clear_inheritable"};
    case E::step_setgroups:
      return {http_status::internal_server_error, "step_setgroups"};
    case E::step_setresgid:
      return {http_status::internal_server_error, "step_setresgid"};
    case E::step_setresuid:
      return {http_status::internal_server_error, "step_setresuid"};
    case E::step_no_new_privs:
      return {http_status::internal_server_error, "step_no_new_privs"};
    case E::step_pdeathsig:
      return {http_status::internal_server_error, "step_pdeathsig"};
    case E::step_exec:
      return {http_status::internal_server_error, "step_exec"};
    case E::child_died:
      return {http_status::internal_server_error, "child_died"};
    case E::cgroup_unavailable:
      return {http_status::internal_server_error, "cgroup_unavailable"};
  }
  return {http_status::internal_server_error, "unmapped"};
}

ErrorClass of(fdpass::errc e) {
  using E = fdpass::errc;
  switch (e) {
    case E::ok:
      return {http_status::ok, "ok"};
    // What the user named cannot be opened: the request is wrong.
    case E::bad_path:
      return {http_status::bad_request, "bad_path"};
    case E::outside_roots:
      return {http_status::bad_request, "outside_roots"};
    case E::escapes_root:
      return {http_status::bad_request, "escapes_root"};
    case E::symlink:
      return {http_status::bad_request, "symlink"};
    case E::not_found:
      return {http_status::not_found, "path_not_found"};
    case E::is_fifo:
      return {http_status::bad_request, "is_fifo"};
    case E::is_socket:
      return {http_status::bad_request, "is_socket"};
    case E::is_char_device:
      return {http_status::bad_request, "is_char_device"};
    case E::is_directory:
      return {http_status::bad_request, "is_directory"};
    case E::unsupported_type:
      return {http_status::bad_request, "unsupported_type"};
    case E::diskseq_unsupported:
      return {http_status::bad_request, "diskseq_unsupported"};
    case E::crosses_mount:
      return {http_status::bad_request, "crosses_mount"};
    case E::hard_linked:
      return {http_status::bad_request, "hard_linked"};
    case E::foreign_owner:
      return {http_status::bad_request, "foreign_owner"};
    case E::invalid_argument:
      return {http_status::bad_request, "invalid_argument"};
    // The object is not (or no longer) the one the caller named: a conflict with the world.
    case E::identity_changed:
      return {http_status::conflict, "identity_changed"};
    case E::diskseq_mismatch:
      return {http_status::conflict, "diskseq_mismatch"};
    // fd transport between the broker and QEMU: never the user's fault.
    case E::control_truncated:
      return {http_status::internal_server_error, "control_truncated"};
    case E::message_truncated:
      return {http_status::internal_server_error, "message_truncated"};
    case E::too_many_fds:
      return {http_status::internal_server_error, "too_many_fds"};
    case E::would_block:
      return {http_status::internal_server_error, "would_block"};
    case E::peer_closed:
      return {http_status::bad_gateway, "peer_closed"};
  }
  return {http_status::internal_server_error, "unmapped"};
}

ErrorClass of(qmp::errc e) {
  using E = qmp::errc;
  switch (e) {
    case E::ok:
      return {http_status::ok, "ok"};
    case E::command_failed:
      return {http_status::bad_gateway, "qemu_error"};
    case E::timeout:
      return {http_status::gateway_timeout, "qemu_timeout"};
    case E::cancelled:
      return {http_status::service_unavailable, "cancelled"};
    case E::closed:
      return {http_status::bad_gateway, "qemu_gone"};
    case E::disconnected:
      return {http_status::bad_gateway, "qemu_gone"};
    case E::invalid_command:
      return {http_status::bad_request, "invalid_command"};
    case E::busy:
      return {http_status::conflict, "busy"};
    // QEMU broke the protocol: a bad gateway.
    case E::line_too_long:
      return {http_status::bad_gateway, "qmp_line_too_long"};
    case E::too_deep:
      return {http_status::bad_gateway, "qmp_too_deep"};
    case E::invalid_json:
      return {http_status::bad_gateway, "qmp_invalid_json"};
    case E::message_too_large:
      return {http_status::bad_gateway, "qmp_message_too_large"};
    case E::unexpected_message:
      return {http_status::bad_gateway, "qmp_unexpected_message"};
    case E::unexpected_fds:
      return {http_status::bad_gateway, "qmp_unexpected_fds"};
    case E::no_greeting:
      return {http_status::bad_gateway, "qmp_no_greeting"};
    case E::negotiation_failed:
      return {http_status::bad_gateway, "qmp_negotiation_failed"};
    case E::io_error:
      return {http_status::bad_gateway, "qmp_io_error"};
    case E::bad_socket:
      return {http_status::internal_server_error, "qmp_bad_socket"};
    case E::unresponsive:
      return {http_status::gateway_timeout, "qemu_unresponsive"};
    case E::bad_reply:
      return {http_status::bad_gateway, "qmp_bad_reply"};
  }
  return {http_status::internal_server_error, "unmapped"};
}

ErrorClass of(api::errc e) {
  using E = api::errc;
  switch (e) {
    case E::ok:
      return {http_status::ok, "ok"};
    case E::no_route:
      return {http_status::not_found, "no_route"};
    case E::method_not_allowed:
      return {http_status::method_not_allowed, "method_not_allowed"};
    case E::malformed_json:
      return {http_status::bad_request, "malformed_json"};
    case E::bad_request:
      return {http_status::bad_request, "bad_request"};
    case E::body_too_large:
      return {http_status::payload_too_large, "body_too_large"};
    case E::header_too_large:
      return {http_status::request_header_fields_too_large, "header_too_large"};
    case E::request_timeout:
      return {http_status::request_timeout, "request_timeout"};
    case E::too_many_connections:
      return {http_status::service_unavailable, "too_many_connections"};
    case E::unauthorized_peer:
      return {http_status::forbidden, "unauthorized_peer"};
    case E::shutting_down:
      return {http_status::service_unavailable, "shutting_down"};
    case E::unsupported_transfer_coding:
      return {http_status::not_implemented, "unsupported_transfer_coding"};
    case E::duplicate_key:
      return {http_status::bad_request, "duplicate_key"};
    case E::unsupported_media_type:
      return {http_status::unsupported_media_type, "unsupported_media_type"};
    case E::method_not_implemented:
      return {http_status::not_implemented, "method_not_implemented"};
  }
  return {http_status::internal_server_error, "unmapped"};
}

ErrorClass of_errno(int ev) {
  const char* name = ::strerrorname_np(ev);
  std::string code = name != nullptr ? name : "errno_" + std::to_string(ev);
  switch (ev) {
    case ENOENT:
      return {http_status::not_found, code};
    case EEXIST:
    case EBUSY:
    case EADDRINUSE:
      return {http_status::conflict, code};
    case EINVAL:
    case ENAMETOOLONG:
    case ENOTDIR:
    case EISDIR:
    case ELOOP:
    case EXDEV:
      return {http_status::bad_request, code};
    case EACCES:
    case EPERM:
    case EROFS:
      return {http_status::forbidden, code};
    case ENOSPC:
    case EDQUOT:
      return {http_status::insufficient_storage, code};
    case EMFILE:
    case ENFILE:
    case ENOMEM:
    case EAGAIN:
      return {http_status::service_unavailable, code};
    case ETIMEDOUT:
      return {http_status::gateway_timeout, code};
    default:
      return {http_status::internal_server_error, code};
  }
}

}  // namespace

ErrorClass classify(const std::error_code& ec) {
  const auto& cat = ec.category();
  if (cat == broker::category()) return of(static_cast<broker::errc>(ec.value()));
  if (cat == lifecycle::category()) return of(static_cast<lifecycle::errc>(ec.value()));
  if (cat == fdpass::category()) return of(static_cast<fdpass::errc>(ec.value()));
  if (cat == qmp::category()) return of(static_cast<qmp::errc>(ec.value()));
  if (cat == api::category()) return of(static_cast<api::errc>(ec.value()));
  if (cat == std::system_category() || cat == std::generic_category()) return of_errno(ec.value());
  return {http_status::internal_server_error, "internal"};
}

namespace {

// The length of the well-formed UTF-8 sequence at the start of `s` (RFC 3629 4), or 0: an
// overlong form, a surrogate or a code point past U+10FFFF is not one, which JSON parsers refuse.
std::size_t utf8_sequence(std::string_view s) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  const unsigned char c = byte(0);
  if (c < 0x80) return 1;
  std::size_t n = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // the second byte's range
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (s.size() < n || byte(1) < lo || byte(1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k) {
    if ((byte(k) & 0xc0) != 0x80) return 0;
  }
  return n;
}

// `s` as valid UTF-8: an error may quote what a client or QEMU sent (a percent-decoded query
// name, a header, a QMP desc), and JSON must not carry those bytes raw. Each byte that does not
// start a well-formed sequence is written as \xNN.
std::string utf8_text(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    std::size_t n = utf8_sequence(s.substr(i));
    if (n == 0) {
      static constexpr char kHex[] = "0123456789abcdef";
      const auto c = static_cast<unsigned char>(s[i]);
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
      ++i;
      continue;
    }
    out.append(s.substr(i, n));
    i += n;
  }
  return out;
}

}  // namespace

boost::json::object error_body(const Error& e) {
  ErrorClass c = classify(e.code);
  boost::json::object inner;
  inner["code"] = c.code;
  inner["message"] = utf8_text(e.message.empty() ? e.code.message() : e.message);
  if (!e.field.empty()) inner["field"] = utf8_text(e.field);
  if (!e.qmp_class.empty() || !e.qmp_desc.empty()) {
    inner["qmp"] = boost::json::object{{"class", utf8_text(e.qmp_class)}, {"desc", utf8_text(e.qmp_desc)}};
  }
  return boost::json::object{{"error", std::move(inner)}};
}

}  // namespace broker::api
