#include "broker/domain/event_bus.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace broker {
namespace asio = boost::asio;

boost::json::object BusEvent::to_json() const {
  boost::json::object o;
  o["seq"] = seq;
  if (!domain.empty()) o["domain"] = domain;
  o["kind"] = kind;
  o["name"] = name;
  o["data"] = data;
  o["timestamp_us"] = timestamp_us;
  return o;
}

EventStream::EventStream(EventBus& bus, asio::any_io_executor ex, std::string domain,
                         std::size_t cap)
    : bus_(&bus), domain_(std::move(domain)), capacity_(cap), wake_(ex) {
  wake_.expires_at(asio::steady_timer::time_point::max());
}

EventStream::~EventStream() {
  if (bus_ != nullptr) bus_->streams_.erase(self_);
}

void EventStream::push(const BusEvent& e) {
  if (closed_) return;
  if (!domain_.empty() && e.domain != domain_) return;
  if (queue_.size() >= capacity_) {
    // The consumer fell behind: tell it once, then stop queueing for it.
    BusEvent dropped;
    dropped.seq = e.seq;
    dropped.kind = "dropped";
    dropped.name = "dropped";
    dropped.data["queued"] = queue_.size();
    dropped.timestamp_us = e.timestamp_us;
    queue_.push_back(std::move(dropped));
    closed_ = true;
  } else {
    queue_.push_back(e);
  }
  wake_.cancel();
}

asio::awaitable<std::optional<BusEvent>> EventStream::next(
    std::chrono::steady_clock::time_point deadline) {
  while (queue_.empty()) {
    if (closed_) co_return std::nullopt;
    wake_.expires_at(deadline);
    auto [ec] = co_await wake_.async_wait(asio::as_tuple(asio::use_awaitable));
    if (!ec) {  // the deadline, not a wake-up
      if (queue_.empty()) co_return std::nullopt;
      break;
    }
  }
  BusEvent e = std::move(queue_.front());
  queue_.pop_front();
  co_return e;
}

EventBus::~EventBus() {
  for (auto* s : streams_) s->bus_ = nullptr;
}

void EventBus::publish(std::string domain, std::string kind, std::string name,
                       boost::json::object data) {
  BusEvent e;
  e.seq = ++seq_;
  e.domain = std::move(domain);
  e.kind = std::move(kind);
  e.name = std::move(name);
  e.data = std::move(data);
  e.timestamp_us = std::chrono::duration_cast<std::chrono::microseconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
  for (auto* s : streams_) s->push(e);
}

std::unique_ptr<EventStream> EventBus::subscribe(std::string domain, std::size_t capacity) {
  std::unique_ptr<EventStream> s(new EventStream(*this, ex_, std::move(domain), capacity));
  streams_.push_front(s.get());
  s->self_ = streams_.begin();
  return s;
}

}  // namespace broker
