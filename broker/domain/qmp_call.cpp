#include "broker/domain/qmp_call.hpp"

#include "broker/core/errc.hpp"
#include "qmp/client.hpp"

namespace broker {

Error from_qmp(const qmp::Error& e, std::string_view context) {
  Error out(e.code, std::string(context) + ": " + (e.message.empty() ? e.code.message() : e.message));
  out.qmp_class = e.qmp_class;
  out.qmp_desc = e.qmp_desc;
  return out;
}

Result<qmp::Client*> qmp_client(Domain& d) {
  if (d.qmp() == nullptr || !d.qmp()->is_open()) {
    return Error(make_error_code(errc::qemu_gone), "domain " + d.name() + " has no running QEMU");
  }
  return d.qmp();
}

boost::asio::awaitable<Result<boost::json::value>> qmp_call(Domain& d, qmp::Command c,
                                                            std::chrono::milliseconds timeout) {
  auto q = qmp_client(d);
  if (!q) co_return q.error();
  const auto sent = std::chrono::steady_clock::now();
  auto r = co_await (*q)->execute(std::move(c), qmp::after(timeout));
  if (d.metrics != nullptr && (r || r.error().code == qmp::errc::command_failed)) {
    d.metrics->qmp_round_trip(std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now() - sent));
  }
  if (!r) co_return from_qmp(r.error(), "domain " + d.name());
  co_return std::move(*r);
}

}  // namespace broker
