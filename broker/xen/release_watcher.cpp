#include "broker/xen/release_watcher.hpp"

namespace broker::xen {

Result<void> ReleaseWatcher::start() { return xs_.watch("@releaseDomain", kReleaseToken); }

Result<std::vector<std::uint32_t>> ReleaseWatcher::poll(const std::vector<std::uint32_t>& tracked) {
  auto events = xs_.take_events();
  if (!events) return events.error();
  bool released_any = false;
  for (const auto& ev : *events) {
    released_any = released_any || (ev.token == kReleaseToken && ev.path == "@releaseDomain");
  }
  if (!released_any) return std::vector<std::uint32_t>();
  auto now = domains_.list();
  if (!now) return now.error();
  return released(tracked, *now);
}

}  // namespace broker::xen
